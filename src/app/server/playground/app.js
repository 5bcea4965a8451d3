// hypergen playground: talks to this server's API (the same routes any client uses).
// No dependencies, no build step. The API key, when the server asks for one, lives in
// sessionStorage (this tab only) and goes out only in the Authorization header.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "hypergen.apiKey";
  const HISTORY_STORE = "hypergen.history";
  const HISTORY_MAX = 40;
  const HEALTH_EVERY_MS = 5000;
  const EXT = { png: "png", jpeg: "jpg", webp: "webp" };

  let running = null; // the AbortController of the request in flight
  let lorasPending = false; // /v1/loras answered 401: ask again once a key is known
  let editImage = null; // { blob, width, height } of the image being edited

  // ---- API access -------------------------------------------------------------------

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  /** fetch with the key; on 401 asks for one (saying why) and retries until the user gives up. */
  async function apiFetch(path, init = {}) {
    for (;;) {
      const resp = await fetch(path, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
      if (resp.status !== 401) return resp;
      const why = await errorOf(resp.clone());
      const key = await askKey(sessionStorage.getItem(KEY_STORE) ? why.message : "");
      if (!key) return resp;
    }
  }

  /** The dialog asking for the key; resolves to the key, or null when cancelled. */
  function askKey(message) {
    const dialog = $("key-dialog");
    const input = $("api-key");
    const err = $("key-error");
    err.hidden = !message;
    err.textContent = message || "";
    input.value = "";
    return new Promise((resolve) => {
      const done = (key) => {
        $("key-form").onsubmit = null;
        $("key-cancel").onclick = null;
        dialog.onclose = null;
        if (dialog.open) dialog.close();
        if (key) {
          sessionStorage.setItem(KEY_STORE, key);
          if (lorasPending) loadLoras();
          for (const update of Object.values(tokenCounters)) update();
        }
        resolve(key);
      };
      $("key-form").onsubmit = (e) => {
        e.preventDefault();
        const key = input.value.trim();
        if (key) done(key);
      };
      $("key-cancel").onclick = () => done(null);
      dialog.onclose = () => done(null);
      dialog.showModal();
      input.focus();
    });
  }

  /** OpenAI's error object from a failed response (or a stand-in for a body that is not one). */
  async function errorOf(resp) {
    const text = await resp.text().catch(() => "");
    try {
      const e = JSON.parse(text).error;
      if (e && e.message) return e;
    } catch (_) { /* not JSON: fall through */ }
    return { message: `HTTP ${resp.status}${text ? ": " + text.slice(0, 300) : ""}`, param: null };
  }

  function showError(e) {
    $("error").hidden = false;
    $("error").scrollIntoView({ block: "nearest" });
    $("error-message").textContent = e.message;
    $("error-param").hidden = !e.param;
    $("error-param").querySelector("code").textContent = e.param || "";
    if (e.param) {
      const field = { size: "width", num_inference_steps: "steps", guidance_scale: "guidance",
        output_compression: "quality", partial_images: "partials" }[e.param] || e.param;
      const el = $(field);
      if (el && el.setAttribute) el.setAttribute("aria-invalid", "true");
    }
  }

  function clearError() {
    $("error").hidden = true;
    for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  // ---- server facts: health, schema defaults, LoRAs ----------------------------------

  async function refreshHealth() {
    const dot = $("health-status");
    try {
      const resp = await fetch("/health", { cache: "no-store" });
      const h = await resp.json();
      dot.textContent = "●";
      dot.className = "dot " + (h.status === "healthy" ? "ok" : "bad");
      dot.title = h.status;
      $("health-model").textContent = h.model;
      $("health-device").textContent = h.device;
      $("health-queue").textContent = String(h.queue_size);
    } catch (_) {
      dot.textContent = "●";
      dot.className = "dot bad";
      dot.title = "unreachable";
      $("health-queue").textContent = "server unreachable";
    }
  }

  /** Defaults, ranges and choices from the server's own schema, so they are never restated here. */
  async function loadSchema() {
    let spec;
    try {
      spec = await (await fetch("/openapi.json")).json();
    } catch (_) {
      return; // empty fields are left out of requests: the server's defaults apply
    }
    const schemas = (spec.components || {}).schemas || {};
    const props = (schemas.ImageGenerationRequest || {}).properties || {};
    for (const [id, name] of [["steps", "num_inference_steps"], ["guidance", "guidance_scale"], ["n", "n"]]) {
      const p = props[name] || {};
      const el = $(id);
      if (p.default !== undefined && el.value === "") el.value = p.default;
      if (p.minimum !== undefined) el.min = p.minimum;
      if (p.maximum !== undefined) el.max = p.maximum;
    }
    const schedulers = (schemas.SchedulerName || {}).enum || [];
    for (const name of schedulers) $("scheduler").append(new Option(name, name));
    const formats = (schemas.OutputFormatName || {}).enum;
    if (formats) {
      const sel = $("output-format");
      sel.replaceChildren(...formats.map((f) => new Option(f, f)));
    }
  }

  /** The LoRA picker: shown only when the server takes adapters per request
   * (`GET /v1/loras` answers `enabled: true` with a non-empty list). */
  async function loadLoras() {
    lorasPending = false;
    let resp;
    try {
      resp = await fetch("/v1/loras", { headers: authHeaders() });
    } catch (_) {
      return;
    }
    if (resp.status === 401) {
      lorasPending = true;
      return;
    }
    if (!resp.ok) {
      $("loras").hidden = true; // an older server without the route
      return;
    }
    const body = await resp.json().catch(() => ({}));
    const items = body.enabled && Array.isArray(body.data) ? body.data : [];
    const list = $("lora-list");
    list.replaceChildren();
    items.forEach((item, i) => {
      const path = item.id;
      if (!path) return;
      const li = document.createElement("li");
      li.className = "row";
      li.innerHTML = `<label class="check"><input type="checkbox" id="lora-${i}"> <span></span></label>
        <label class="check">scale <input type="number" id="lora-scale-${i}" min="0" max="2" step="0.05" value="1"></label>`;
      li.querySelector("span").textContent = path;
      li.querySelector('input[type="checkbox"]').dataset.path = path;
      list.append(li);
    });
    $("loras").hidden = list.children.length === 0;
  }

  function selectedLoras() {
    if ($("loras").hidden) return [];
    return [...$("lora-list").querySelectorAll('input[type="checkbox"]:checked')].map((box) => ({
      path: box.dataset.path,
      scale: Number($(box.id.replace("lora-", "lora-scale-")).value || 1),
    }));
  }

  // ---- the form --------------------------------------------------------------------

  function randomSeed() {
    const a = new Uint32Array(1);
    crypto.getRandomValues(a);
    return a[0];
  }

  /** A number field's value as a number, or undefined when empty (the server's default). */
  function num(id) {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  }

  /** The settings of the form, as the API names them; the seed is always chosen here. */
  function readSettings() {
    if ($("seed-random").checked || $("seed").value.trim() === "") $("seed").value = randomSeed();
    const s = {
      prompt: $("prompt").value,
      negative_prompt: $("negative_prompt").value || undefined,
      size: `${$("width").value.trim()}x${$("height").value.trim()}`,
      n: num("n"),
      num_inference_steps: num("steps"),
      guidance_scale: num("guidance"),
      seed: num("seed"),
      scheduler: $("scheduler").value || undefined,
      output_format: $("output-format").value,
      output_compression: $("output-format").value === "jpeg" ? num("quality") : undefined,
    };
    const loras = selectedLoras();
    if (loras.length) s.loras = loras;
    for (const k of Object.keys(s)) if (s[k] === undefined) delete s[k];
    return s;
  }

  /** Under a prompt box: its tokens per chunk of 75, as A1111 shows them (`80/150`). */
  const tokenCounters = {};
  function watchTokens(id) {
    const out = $(id + "-tokens");
    let timer = null;
    let seq = 0;
    const update = async () => {
      const mine = ++seq;
      const prompt = $(id).value;
      if (!prompt) { out.textContent = ""; return; }
      try {
        const resp = await fetch("/v1/tokenize", {
          method: "POST",
          headers: { "Content-Type": "application/json", ...authHeaders() },
          body: JSON.stringify({ prompt }),
        });
        if (!resp.ok || mine !== seq) return;
        const t = await resp.json();
        if (t.prompt_syntax === "plain") {
          const cut = t.total > t.chunk_length ? " (the rest is cut off)" : "";
          out.textContent = `${t.total}/${t.chunk_length} tokens${cut}`;
        } else {
          const chunks = t.chunks.length > 1 ? ` · per chunk ${t.chunks.join(", ")}` : "";
          out.textContent = `${t.total}/${t.chunk_length * t.chunks.length} tokens${chunks}`;
        }
      } catch (_) { /* a convenience: no count is no harm */ }
    };
    $(id).addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 250); });
    tokenCounters[id] = update;
  }

  /** Puts saved settings back into the form (history, "Reuse settings"). */
  function applySettings(s) {
    $("prompt").value = s.prompt || "";
    $("negative_prompt").value = s.negative_prompt || "";
    if (s.size && /^\d+x\d+$/.test(s.size)) {
      const [w, h] = s.size.split("x");
      $("width").value = w;
      $("height").value = h;
      syncPreset();
    }
    const set = (id, v) => { if (v !== undefined) $(id).value = v; };
    set("n", s.n);
    set("steps", s.num_inference_steps);
    set("guidance", s.guidance_scale);
    set("seed", s.seed);
    $("seed-random").checked = s.seed === undefined;
    $("scheduler").value = s.scheduler || "";
    if (s.output_format) $("output-format").value = s.output_format;
    set("quality", s.output_compression);
    for (const update of Object.values(tokenCounters)) update();
    $("prompt").focus();
  }

  function syncPreset() {
    const size = `${$("width").value}x${$("height").value}`;
    const known = [...$("size-preset").options].some((o) => o.value === size);
    $("size-preset").value = known ? size : "custom";
  }

  // ---- streaming requests ------------------------------------------------------------

  function setBusy(busy) {
    $("generate").disabled = busy;
    $("edit-run").disabled = busy || !editImage;
    $("cancel").disabled = !busy;
    $("out").setAttribute("aria-busy", String(busy));
  }

  function progress(pct, text) {
    $("progress").value = pct;
    $("progress-text").textContent = text;
  }

  /** Yields `{event, data}` for each server-sent event of `resp`. */
  async function* events(resp) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue; // keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  /**
   * Sends a streamed request (`job.kind` is "generation" or "edit") and shows its
   * progress, partial previews and images; Cancel aborts the fetch, which closes the
   * stream, which stops the job on the server at its next step.
   */
  async function run(job) {
    clearError();
    const ctrl = new AbortController();
    running = ctrl;
    setBusy(true);
    progress(0, "Sending…");
    $("status").scrollIntoView({ block: "nearest" }); // below the form on a phone
    $("preview-box").hidden = true;
    $("preview").dataset.count = "0";
    const n = job.settings.n || 1;
    let done = 0;
    let firstImage = null;
    try {
      const resp = await apiFetch(job.path, { method: "POST", body: job.body(), headers: job.headers, signal: ctrl.signal });
      if (!resp.ok) {
        progress(0, `Failed (HTTP ${resp.status}).`);
        showError(await errorOf(resp));
        return;
      }
      for await (const { event, data } of events(resp)) {
        if (event === "hypergen.progress") {
          if (data.queue_position !== undefined) {
            progress(0, `Waiting in the queue: ${data.queue_position} ahead.`);
          } else if (data.total) {
            const pct = Math.round((100 * data.step) / data.total);
            progress(pct, `Step ${data.step} of ${data.total} (${pct} %), ${data.elapsed_seconds.toFixed(1)} s`);
          }
        } else if (event.endsWith(".partial_image")) {
          const img = $("preview");
          img.src = `data:image/${data.output_format};base64,${data.b64_json}`;
          img.dataset.count = String(Number(img.dataset.count) + 1);
          $("preview-box").hidden = false;
        } else if (event.endsWith(".completed")) {
          const blob = b64Blob(data.b64_json, `image/${data.output_format}`);
          firstImage = firstImage || blob;
          addResult(job, blob, done, n, data.size);
          done += 1;
          if (done === n) progress(100, `Done: ${n} image${n > 1 ? "s" : ""} (100 %).`);
        } else if (event === "error") {
          progress(0, "Failed.");
          showError(data.error || { message: "the generation failed" });
          return;
        }
      }
      if (done < n) {
        progress(0, "Failed.");
        showError({ message: `the stream ended after ${done} of ${n} images` });
      } else {
        $("preview-box").hidden = true;
        saveHistory(job, firstImage);
      }
    } catch (e) {
      if (e.name === "AbortError") {
        progress(0, "Cancelled.");
      } else {
        progress(0, "Failed.");
        showError({ message: String(e.message || e) });
      }
    } finally {
      running = null;
      setBusy(false);
    }
  }

  function b64Blob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  function generate() {
    const settings = readSettings();
    const payload = { ...settings, stream: true, stream_progress: true, partial_images: num("partials") ?? 0 };
    run({
      kind: "generation",
      path: "/v1/images/generations",
      settings,
      headers: { "Content-Type": "application/json" },
      body: () => JSON.stringify(payload),
    });
  }

  async function edit() {
    if (!editImage) return;
    const settings = readSettings();
    delete settings.size;
    const strength = num("strength");
    if (strength !== undefined) settings.strength = strength;
    const mask = await maskBlob();
    const fields = { ...settings };
    // A form field holds the adapters as JSON text.
    if (fields.loras) fields.loras = JSON.stringify(fields.loras);
    // Shown with the result; not sent: the server rounds the image's size down to multiples of 8.
    settings.size = `${editImage.width - (editImage.width % 8)}x${editImage.height - (editImage.height % 8)}`;
    run({
      kind: "edit",
      path: "/v1/images/edits",
      settings,
      mask: !!mask,
      body: () => {
        const form = new FormData();
        form.append("image", editImage.blob, "image." + (EXT[editImage.blob.type.split("/")[1]] || "png"));
        if (mask) form.append("mask", mask, "mask.png");
        for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
        form.append("stream", "true");
        form.append("stream_progress", "true");
        form.append("partial_images", String(num("partials") ?? 0));
        return form;
      },
    });
  }

  // ---- results, code snippets, history -----------------------------------------------

  const LABELS = [["prompt", "prompt"], ["negative_prompt", "negative"], ["size", "size"],
    ["num_inference_steps", "steps"], ["guidance_scale", "guidance"], ["scheduler", "scheduler"],
    ["seed", "seed"], ["strength", "strength"], ["output_format", "format"], ["output_compression", "quality"]];

  function addResult(job, blob, index, n, size) {
    const s = job.settings;
    const li = $("result-template").content.firstElementChild.cloneNode(true);
    const url = URL.createObjectURL(blob);
    const img = li.querySelector("img");
    img.src = url;
    img.alt = `${job.kind === "edit" ? "Edited" : "Generated"} image ${index + 1} of ${n}: ${s.prompt}`;
    img.dataset.seed = String(s.seed);
    img.dataset.kind = job.kind;
    const dl = li.querySelector("dl");
    const rows = LABELS.filter(([k]) => s[k] !== undefined && s[k] !== "").map(([k, label]) => [label, String(s[k])]);
    if (size) rows.splice(2, 1, ["size", size]);
    if (n > 1) rows.push(["image", `${index + 1} of ${n} (one batch)`]);
    if (job.kind === "edit") rows.push(["mask", job.mask ? "painted" : "none (image-to-image)"]);
    if (s.loras) rows.push(["LoRAs", s.loras.map((l) => `${l.path} × ${l.scale}`).join(", ")]);
    for (const [label, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dl.append(dt, dd);
    }
    const a = li.querySelector(".download");
    a.href = url;
    a.download = `hypergen-${s.seed}-${index}.${EXT[s.output_format] || "png"}`;
    a.setAttribute("aria-label", `Download image ${index + 1} (seed ${s.seed})`);
    li.querySelector(".reuse").onclick = () => applySettings(s);
    li.querySelector(".to-edit").onclick = () => {
      loadEditImage(blob);
      $("edit").open = true;
      $("edit").scrollIntoView({ block: "nearest" });
      $("strength").focus();
    };
    const curl = curlOf(job);
    const py = pythonOf(job);
    li.querySelector(".curl").textContent = curl;
    li.querySelector(".py").textContent = py;
    li.querySelector(".copy-curl").onclick = (e) => copy(curl, e.target);
    li.querySelector(".copy-py").onclick = (e) => copy(py, e.target);
    $("results").prepend(li);
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      // Plain http on another host has no clipboard API: select the text instead.
      const ta = document.createElement("textarea");
      ta.value = text;
      document.body.append(ta);
      ta.select();
      document.execCommand("copy");
      ta.remove();
    }
    const old = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = old; }, 1500);
  }

  const shq = (s) => `'${String(s).replace(/'/g, `'\\''`)}'`;
  /** A Python literal of a JSON value. */
  function pyLit(v) {
    if (v === null || v === undefined) return "None";
    if (typeof v === "boolean") return v ? "True" : "False";
    if (Array.isArray(v)) return `[${v.map(pyLit).join(", ")}]`;
    if (typeof v === "object") return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyLit(x)}`).join(", ")}}`;
    return JSON.stringify(v);
  }
  const DECODE = `python3 -c 'import sys, json, base64; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'`;

  function curlOf(job) {
    const s = job.settings;
    const base = location.origin;
    const auth = sessionStorage.getItem(KEY_STORE) ? ` \\\n    -H "Authorization: Bearer $HYPERGEN_API_KEY"` : "";
    const out = `out.${EXT[s.output_format] || "png"}`;
    if (job.kind === "generation") {
      return `curl ${base}/v1/images/generations${auth} \\\n    -H "Content-Type: application/json" \\\n` +
        `    -d ${shq(JSON.stringify(s))} \\\n  | ${DECODE} > ${out}`;
    }
    const fields = Object.entries(s).filter(([k]) => k !== "size")
      .map(([k, v]) => ` \\\n    --form-string ${shq(`${k}=${v}`)}`).join("");
    return `curl ${base}/v1/images/edits${auth} \\\n    -F image=@image.png${job.mask ? " -F mask=@mask.png" : ""}${fields} \\\n  | ${DECODE} > ${out}`;
  }

  function pythonOf(job) {
    const s = { ...job.settings };
    const std = job.kind === "generation" ? ["prompt", "n", "size"] : ["prompt", "n"];
    const args = std.filter((k) => s[k] !== undefined).map((k) => `    ${k}=${pyLit(s[k])},`);
    const extra = {};
    for (const [k, v] of Object.entries(s)) if (!std.includes(k) && k !== "size") extra[k] = v;
    const call = job.kind === "generation" ? "generate" : "edit";
    const files = job.kind === "edit"
      ? `    image=open("image.png", "rb"),\n${job.mask ? `    mask=open("mask.png", "rb"),  # white: repaint\n` : ""}`
      : "";
    return `import base64, os
from openai import OpenAI

client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("HYPERGEN_API_KEY", "none"))
result = client.images.${call}(
    model="sdxl",  # ignored: the server runs the model it was started with
${files}${args.join("\n")}
    response_format="b64_json",
    extra_body=${pyLit(extra)},
)
for i, image in enumerate(result.data):
    open(f"image-{i}.${EXT[s.output_format] || "png"}", "wb").write(base64.b64decode(image.b64_json))
`;
  }

  function loadHistory() {
    try {
      const h = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
      return Array.isArray(h) ? h : [];
    } catch (_) {
      return [];
    }
  }

  async function saveHistory(job, blob) {
    const entry = { time: Date.now(), kind: job.kind, settings: job.settings, thumb: await thumbnail(blob) };
    let history = [entry, ...loadHistory()].slice(0, HISTORY_MAX);
    // Thumbnails are small, but the storage is too: drop the oldest until it fits.
    while (history.length) {
      try {
        localStorage.setItem(HISTORY_STORE, JSON.stringify(history));
        break;
      } catch (_) {
        history = history.slice(0, -1);
      }
    }
    renderHistory();
  }

  async function thumbnail(blob) {
    try {
      const bmp = await createImageBitmap(blob);
      const scale = Math.min(1, 96 / Math.max(bmp.width, bmp.height));
      const c = document.createElement("canvas");
      c.width = Math.max(1, Math.round(bmp.width * scale));
      c.height = Math.max(1, Math.round(bmp.height * scale));
      c.getContext("2d").drawImage(bmp, 0, 0, c.width, c.height);
      return c.toDataURL("image/jpeg", 0.7);
    } catch (_) {
      return "";
    }
  }

  function renderHistory() {
    const list = $("history");
    list.replaceChildren();
    for (const entry of loadHistory()) {
      const s = entry.settings || {};
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.setAttribute("aria-label", `Load settings: ${s.prompt || "(no prompt)"}, seed ${s.seed}, ${s.size}`);
      if (entry.thumb) {
        const img = document.createElement("img");
        img.src = entry.thumb;
        img.alt = "";
        b.append(img);
      }
      for (const text of [s.prompt || "(no prompt)", `${entry.kind === "edit" ? "edit · " : ""}seed ${s.seed} · ${s.size}`]) {
        const span = document.createElement("span");
        span.textContent = text;
        b.append(span);
      }
      b.onclick = () => applySettings(s);
      li.append(b);
      list.append(li);
    }
  }

  // ---- the edit canvas ---------------------------------------------------------------

  async function loadEditImage(blob) {
    let bmp;
    try {
      bmp = await createImageBitmap(blob);
    } catch (_) {
      showError({ message: "the browser cannot read this image", param: "image" });
      return;
    }
    editImage = { blob, width: bmp.width, height: bmp.height };
    for (const c of [$("edit-canvas"), $("mask-canvas")]) {
      c.width = bmp.width;
      c.height = bmp.height;
    }
    $("edit-canvas").getContext("2d").drawImage(bmp, 0, 0);
    $("edit-stage").hidden = false;
    setBusy(!!running);
  }

  function setupMask() {
    const c = $("mask-canvas");
    // Read back once per edit (the mask), so the CPU keeps the pixels.
    const ctx = c.getContext("2d", { willReadFrequently: true });
    let last = null;
    const at = (e) => {
      const r = c.getBoundingClientRect();
      return [((e.clientX - r.left) * c.width) / r.width, ((e.clientY - r.top) * c.height) / r.height];
    };
    const stroke = (from, to) => {
      ctx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = "#ff3b30";
      ctx.lineWidth = Number($("brush").value);
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
    };
    c.addEventListener("pointerdown", (e) => {
      c.setPointerCapture(e.pointerId);
      last = at(e);
      stroke(last, last);
      e.preventDefault();
    });
    c.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = at(e);
      stroke(last, p);
      last = p;
    });
    const end = () => { last = null; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    $("mask-clear").onclick = () => ctx.clearRect(0, 0, c.width, c.height);
    $("mask-all").onclick = () => {
      ctx.globalCompositeOperation = "source-over";
      ctx.fillStyle = "#ff3b30";
      ctx.fillRect(0, 0, c.width, c.height);
    };
    $("brush").oninput = (e) => e.target.setAttribute("aria-valuetext", `${e.target.value} pixels`);
  }

  /** The painted mask as an opaque PNG (white: repaint, black: keep), or null if nothing is painted. */
  function maskBlob() {
    const c = $("mask-canvas");
    const src = c.getContext("2d").getImageData(0, 0, c.width, c.height);
    const out = new ImageData(c.width, c.height);
    let painted = 0;
    for (let i = 0; i < src.data.length; i += 4) {
      const v = src.data[i + 3] >= 128 ? 255 : 0;
      painted += v;
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    if (!painted) return Promise.resolve(null);
    const m = document.createElement("canvas");
    m.width = c.width;
    m.height = c.height;
    m.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => m.toBlob(resolve, "image/png"));
  }

  // ---- wiring ------------------------------------------------------------------------

  function init() {
    $("form").addEventListener("submit", (e) => {
      e.preventDefault();
      if (!running) generate();
    });
    $("cancel").onclick = () => running && running.abort();
    $("edit-run").onclick = () => { if (!running) edit(); };
    $("size-preset").onchange = (e) => {
      if (e.target.value === "custom") {
        $("width").focus();
        return;
      }
      const [w, h] = e.target.value.split("x");
      $("width").value = w;
      $("height").value = h;
    };
    $("width").oninput = syncPreset;
    $("height").oninput = syncPreset;
    $("seed-new").onclick = () => {
      $("seed").value = randomSeed();
      $("seed-random").checked = false;
    };
    $("seed").oninput = () => { $("seed-random").checked = false; };
    $("edit-image").onchange = (e) => { if (e.target.files[0]) loadEditImage(e.target.files[0]); };
    $("history-clear").onclick = () => {
      localStorage.removeItem(HISTORY_STORE);
      renderHistory();
    };
    setupMask();
    renderHistory();
    refreshHealth();
    setInterval(refreshHealth, HEALTH_EVERY_MS);
    loadSchema();
    loadLoras();
    watchTokens("prompt");
    watchTokens("negative_prompt");
  }

  init();
})();
