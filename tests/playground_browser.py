"""Drives the playground page (`/`) in headless Chromium over WebDriver, as a person would.

Usage: playground_browser.py BASE_URL API_KEY SCREENSHOT_DIR

Run by tests/suite/server/playground.rs against a real server (fixture model, CPU, with
API_KEY). Needs Debian's `chromium` and `chromium-driver` and PyPI's `selenium`; nothing is
downloaded at run time (the driver and browser paths are given, so Selenium Manager is
not used). Every state is saved as a PNG in SCREENSHOT_DIR. Prints "playground browser OK"
last; any failed check raises (exit status 1).
"""

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

BASE, KEY, SHOTS = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(SHOTS, exist_ok=True)

# Every wait is bounded; a generation of 64x64 in 2 steps takes about a second.
WAIT_S = 60


def find(what):
    path = shutil.which(what)
    if path is None:
        raise SystemExit(f"`{what}` not found (apt-get install chromium chromium-driver)")
    return path


def api(method, path, body=None, key=KEY):
    """(status, JSON body) of an API call made without the browser."""
    req = urllib.request.Request(BASE + path, method=method)
    if key:
        req.add_header("Authorization", "Bearer " + key)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=WAIT_S) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


profile = tempfile.mkdtemp(prefix="hypergen-chromium-")
opts = webdriver.ChromeOptions()
opts.binary_location = find("chromium")
for arg in [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--window-size=1280,900", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
]:
    opts.add_argument(arg)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(executable_path=find("chromedriver")), options=opts)
logs = []
step_no = 0


def shot(name):
    global step_no
    step_no += 1
    path = os.path.join(SHOTS, f"{step_no:02d}-{name}.png")
    driver.save_screenshot(path)
    print(f"screenshot: {path}", flush=True)


def js(script, *args):
    return driver.execute_script(script, *args)


def el(id_):
    return driver.find_element(By.ID, id_)


def wait(what, cond):
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: cond())
    except Exception:
        shot("timeout")
        error = js("return document.getElementById('error').innerText")
        raise AssertionError(f"timed out waiting for {what}; progress: {el('progress-text').text!r}, "
                             f"error: {error!r}")


def fill(id_, value):
    e = el(id_)
    e.clear()
    e.send_keys(str(value))


def results():
    return driver.find_elements(By.CSS_SELECTOR, "#results > li img")


def wait_results(count):
    wait(f"{count} results", lambda: len(results()) == count and js(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    return results()


def pixels(img):
    """The RGBA pixels of a result image, as the browser decoded them."""
    return js("""
        const img = arguments[0], c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        return Array.from(ctx.getImageData(0, 0, c.width, c.height).data).join(',');""", img)


def watch_progress():
    """Records every text the progress line shows from now on."""
    js("""window.__progress = [];
        const p = document.getElementById('progress-text');
        new MutationObserver(() => window.__progress.push(p.textContent + ' @' +
            document.getElementById('progress').value)).observe(p, {childList: true, characterData: true, subtree: true});""")


def generate_and_wait(count):
    watch_progress()
    el("generate").click()
    imgs = wait_results(count)
    wait("the progress to say 100 %", lambda: "100 %" in el("progress-text").text)
    assert el("progress").get_attribute("value") == "100", el("progress").get_attribute("value")
    seen = js("return window.__progress")
    assert any(t.startswith("Step 2 of 2 (100 %)") for t in seen), seen
    return imgs


try:
    # The page and its assets load without a key; /health fills the header.
    driver.get(BASE + "/")
    wait("/health in the header", lambda: el("health-model").text not in ("", "…"))
    status, health = api("GET", "/health", key=None)
    assert el("health-model").text == health["model"], (el("health-model").text, health)
    assert el("health-device").text == health["device"]
    assert el("health-queue").text == str(health["queue_size"])
    assert "healthy" == el("health-status").get_attribute("title")
    # Defaults come from the schema: the scheduler list is filled from it.
    wait("the schema's schedulers", lambda: len(el("scheduler").find_elements(By.TAG_NAME, "option")) > 1)
    # The LoRA picker lists what the server's LoRA directory offers (`--lora-dir`).
    loras_status, loras = api("GET", "/v1/loras")
    assert loras_status == 200 and loras["enabled"], (loras_status, loras)
    # Without the key yet, the list cannot be read: the picker waits for the key.
    assert not el("loras").is_displayed()
    presets = [o.get_attribute("value") for o in el("size-preset").find_elements(By.TAG_NAME, "option")]
    assert presets[:9] == ["1024x1024", "1152x896", "896x1152", "1216x832", "832x1216",
                           "1344x768", "768x1344", "1536x640", "640x1536"], presets
    shot("loaded")

    # Keyboard: the focus order follows the page (skip link, docs link, then the form).
    order = []
    for _ in range(8):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        order.append(js("const a = document.activeElement; return a.id || a.className || a.tagName"))
    assert order == ["skip", "A", "prompt", "negative_prompt", "size-preset", "width", "height", "steps"], order

    # Generate 64x64 in 2 steps with a fixed seed; the server wants a key: the page asks.
    fill("prompt", "a red cube on a wooden table")
    fill("negative_prompt", "blurry")
    fill("width", 64)
    fill("height", 64)
    assert el("size-preset").get_attribute("value") == "custom"
    fill("steps", 2)
    fill("seed", 1234)
    assert not el("seed-random").is_selected()
    fill("partials", 1)
    watch_progress()
    el("generate").click()
    wait("the API key dialog", lambda: el("key-dialog").get_attribute("open") is not None)
    shot("key-dialog")
    el("api-key").send_keys(KEY)
    el("key-ok").click()
    first = wait_results(1)[0]
    wait("the progress to say 100 %", lambda: "100 %" in el("progress-text").text)
    assert el("progress").get_attribute("value") == "100"
    seen = js("return window.__progress")
    assert any(t.startswith("Step 1 of 2 (50 %)") for t in seen), seen
    assert any(t.startswith("Step 2 of 2 (100 %)") for t in seen), seen
    assert js("return document.getElementById('preview').dataset.count") == "1", "one partial image"
    assert js("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", first) == [64, 64]
    assert first.get_attribute("data-seed") == "1234"
    shot("generated")

    # Under the prompt, its tokens per chunk of 75, as A1111 shows them: a 300-token
    # prompt is four full chunks (the key is known now).
    long_prompt = " ".join(["cat"] * 300)
    fill("prompt", long_prompt)
    wait("the token count", lambda: el("prompt-tokens").text.startswith("300/300 tokens"))
    assert "per chunk 75, 75, 75, 75" in el("prompt-tokens").text, el("prompt-tokens").text
    fill("prompt", "a red cube on a wooden table")
    wait("the short count", lambda: el("prompt-tokens").text.endswith("/75 tokens"))

    # The key stays in this tab's sessionStorage only: not in the URL, not in localStorage.
    assert js("return sessionStorage.getItem('hypergen.apiKey')") == KEY
    assert KEY not in driver.current_url
    assert KEY not in js("return JSON.stringify(Object.assign({}, localStorage))")
    assert KEY not in js("return document.body.innerText")

    # With the key, the picker shows the directory's adapters.
    wait("the LoRA picker", lambda: el("loras").is_displayed())
    names = [s.text for s in driver.find_elements(By.CSS_SELECTOR, "#lora-list span")]
    assert names == [e["id"] for e in loras["data"]] == ["kohya.safetensors"], names

    # The same seed gives the same pixels; another seed other pixels.
    imgs = generate_and_wait(2)
    assert pixels(imgs[0]) == pixels(imgs[1]), "the same seed gave different pixels"
    assert imgs[0].get_attribute("data-seed") == "1234"
    shot("same-seed")
    el("seed-new").click()
    assert el("seed").get_attribute("value") != "1234"
    imgs = generate_and_wait(3)
    assert pixels(imgs[0]) != pixels(imgs[2]), "another seed gave the same pixels"

    # The snippets repeat the exact request and never hold the key.
    code = js("return document.querySelector('#results li .curl').textContent")
    assert '"seed":' + imgs[0].get_attribute("data-seed") in code, code
    assert '"num_inference_steps":2' in code and "$HYPERGEN_API_KEY" in code and KEY not in code, code
    py = js("return document.querySelector('#results li .py').textContent")
    assert "client.images.generate(" in py and 'size="64x64"' in py and KEY not in py, py

    # Edit the first image: paint a mask stroke across its middle, then send it.
    oldest = driver.find_elements(By.CSS_SELECTOR, "#results > li")[-1]
    oldest.find_element(By.CSS_SELECTOR, ".to-edit").click()
    wait("the edit canvas", lambda: el("edit-stage").is_displayed() and
         js("return document.getElementById('mask-canvas').width") == 64)
    canvas = el("mask-canvas")
    w = canvas.size["width"]
    (ActionChains(driver).move_to_element_with_offset(canvas, -w // 4, 0).click_and_hold()
     .move_by_offset(w // 2, 0).release().perform())
    painted = js("""const c = document.getElementById('mask-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 127; return n;""")
    assert 0 < painted < 64 * 64, painted
    shot("mask")
    watch_progress()
    el("edit-run").click()
    imgs = wait_results(4)
    wait("the edit's progress to say 100 %", lambda: "100 %" in el("progress-text").text)
    edited = imgs[0]
    assert edited.get_attribute("data-kind") == "edit"
    assert js("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", edited) == [64, 64]
    assert pixels(edited) != pixels(imgs[3]), "the edit changed nothing"
    meta = js("return document.querySelector('#results li dl').innerText")
    assert "painted" in meta, meta
    driver.execute_script("window.scrollTo(0, 0)")
    shot("edited")

    # A LoRA picked from the list: the same seed gives other pixels, and the snippet
    # names the adapter.
    fill("seed", 1234)
    el("lora-0").click()
    imgs = generate_and_wait(5)
    assert imgs[0].get_attribute("data-seed") == imgs[4].get_attribute("data-seed") == "1234"
    assert pixels(imgs[0]) != pixels(imgs[4]), "the LoRA changed nothing"
    code = js("return document.querySelector('#results li .curl').textContent")
    assert '"loras":[{"path":"kohya.safetensors","scale":1}]' in code, code
    shot("lora")
    el("lora-0").click()

    # A 400: the server's own words, and the field it names.
    fill("width", 100)
    el("generate").click()
    wait("the error", lambda: el("error").is_displayed())
    status, body = api("POST", "/v1/images/generations", {
        "prompt": "x", "size": "100x64", "num_inference_steps": 2, "seed": 1})
    assert status == 400, (status, body)
    assert el("error-message").text == body["error"]["message"], (el("error-message").text, body)
    assert body["error"]["param"] == "size"
    assert el("error-param").text == "param: size", el("error-param").text
    assert el("width").get_attribute("aria-invalid") == "true"
    assert len(results()) == 5
    shot("error-400")

    # Cancel: a long run (150 steps) is stopped once it is running; the server side is
    # checked by the caller (its worker counts a cancelled job).
    fill("width", 64)
    fill("steps", 150)
    fill("partials", 0)
    el("generate").click()
    wait("the long run to start", lambda: el("progress-text").text.startswith("Step "))
    assert not el("error").is_displayed(), "a new request clears the last error"
    el("cancel").click()
    wait("the cancellation", lambda: el("progress-text").text == "Cancelled.")
    assert el("generate").is_enabled() and not el("cancel").is_enabled()
    shot("cancelled")

    # The history survives a reload; the key does too (same tab), without a new prompt.
    driver.refresh()
    wait("the history", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#history button")) == 5)
    fill("prompt", "")
    driver.find_elements(By.CSS_SELECTOR, "#history button")[-1].click()
    assert el("prompt").get_attribute("value") == "a red cube on a wooden table"
    assert el("seed").get_attribute("value") == "1234" and el("width").get_attribute("value") == "64"
    assert js("return sessionStorage.getItem('hypergen.apiKey')") == KEY
    shot("history")

    # A phone-sized screen: nothing wider than the screen.
    driver.set_window_size(390, 844)
    time.sleep(0.3)
    overflow = js("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
    shot("phone")
finally:
    logs = driver.get_log("browser")
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)

# No JavaScript errors or warnings; the only failed loads are the API answers the test
# asked for (401 before the key, 400, and 404 from /v1/loras where it does not exist;
# the token count's 401 while the page has no key).
bad = []
for entry in logs:
    if entry["level"] not in ("SEVERE", "WARNING"):
        continue
    msg = entry["message"]
    expected = entry.get("source") == "network" and (
        ("/v1/images/generations" in msg and ("status of 401" in msg or "status of 400" in msg))
        or ("/v1/loras" in msg and ("status of 404" in msg or "status of 401" in msg))
        or ("/v1/tokenize" in msg and "status of 401" in msg))
    if not expected:
        bad.append(entry)
assert not bad, "console errors:\n" + "\n".join(json.dumps(b) for b in bad)
print(f"console: {len(logs)} entries, none unexpected")
print("playground browser OK")
