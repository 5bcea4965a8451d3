"""Generated SDKs against a running hypergen server (tests/suite/server/contract.rs).

Usage: TOOLS/venv/bin/python tests/sdk/run_sdks.py SCHEMA BASE_URL API_KEY TOOLS WORK

Generates clients from SCHEMA (the committed openapi/openapi.json) with
openapi-python-client, OpenAPI Generator (`python`, `typescript-fetch`) and
openapi-typescript (+ openapi-fetch); fails on a generator warning not listed below with
its reason, and on any operation or model missing from the generated code. Then drives
each client through every route of the server at BASE_URL (started with API_KEY and
`--max-steps 4`): health, models, LoRAs, a generation decoded as PNG, a `url` answer fetched
through the client, a 400 whose `message` and `param` the client exposes, a 401 from a
client without the key. TOOLS holds the generators (scripts/test installs them);
WORK is an empty scratch folder. Prints each step's time and "sdk clients OK".
"""

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

SCHEMA, BASE, KEY, TOOLS, WORK = sys.argv[1:6]
HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.join(TOOLS, "venv", "bin")
NODE_BIN = os.path.join(TOOLS, "node", "node_modules", ".bin")
PROMPT = "a photo of an astronaut riding a horse on mars"
# Over the server's `--max-steps 4` but within the schema's 150: refused by the server
# alone, so the client sends it and must expose the server's 400.
TOO_MANY_STEPS = 5

# Generator warnings that drop nothing, with the reason. Anything else fails the test.
ALLOWED_WARNINGS = {
    "openapi-generator python": [
        # Logged for the multipart body of createImageEdit, whose method and form
        # fields are generated (checked below).
        r"Failed to get the schema name: null",
    ],
}

DOC = json.load(open(SCHEMA))
OPERATIONS = [op["operationId"] for item in DOC["paths"].values() for op in item.values()]
MODELS = list(DOC["components"]["schemas"])
timings = []


def step(name, start):
    took = time.monotonic() - start
    timings.append((name, took))
    print(f"[{took:6.1f} s] {name}", flush=True)


def run(cmd, cwd=None, env=None):
    """Runs cmd; returns its output; fails with the output when it fails."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{text}")
    return text


def check_warnings(generator, text, pattern):
    """Fails on a warning line of `generator` not allowed above."""
    allowed = ALLOWED_WARNINGS.get(generator, [])
    bad = [
        line
        for line in text.splitlines()
        if re.search(pattern, line) and not any(re.search(a, line) for a in allowed)
    ]
    if bad:
        sys.exit(f"{generator} warned:\n" + "\n".join(bad) + f"\n\nfull output:\n{text}")


def check_generated(generator, root, names):
    """Fails unless every operation and model appears in the generated sources."""
    sources = open(root, encoding="utf-8").read() if os.path.isfile(root) else ""
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith((".py", ".ts")):
                # File names too: openapi-python-client names a module per operation.
                sources += f + open(os.path.join(folder, f), encoding="utf-8").read()
    flat = re.sub(r"[_\W]", "", sources).lower()
    missing = [n for n in names if re.sub(r"[_\W]", "", n).lower() not in flat]
    if missing:
        sys.exit(f"{generator} dropped {missing}")


def is_png(data):
    assert bytes(data[:8]) == b"\x89PNG\r\n\x1a\n", f"not a PNG: {bytes(data[:16])!r}"


def image_id(url):
    assert url.startswith(BASE + "/v1/images/files/"), url
    return url.rsplit("/", 1)[1]


# ---------------------------------------------------------------- openapi-python-client
def openapi_python_client():
    out = os.path.join(WORK, "opc")
    config = os.path.join(WORK, "opc.yaml")
    with open(config, "w") as f:
        # Image answers as bytes (without this it omits them, with a warning).
        f.write("content_type_overrides:\n")
        for t in ("image/png", "image/jpeg", "image/webp"):
            f.write(f"  {t}: application/octet-stream\n")
    start = time.monotonic()
    text = run(
        [os.path.join(VENV_BIN, "openapi-python-client"), "generate", "--path", SCHEMA,
         "--config", config, "--output-path", out, "--overwrite"],
        env={**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"]},
    )
    step("openapi-python-client: generate", start)
    # Its warnings are paragraphs after this line; "ruff is not in PATH" is not one.
    if "Warning(s) encountered" in text:
        sys.exit(f"openapi-python-client warned:\n{text}")
    check_generated("openapi-python-client", out, OPERATIONS + MODELS)

    start = time.monotonic()
    sys.path.insert(0, out)
    pkg = "hypergen_client"
    client_mod = importlib.import_module(pkg)
    health = importlib.import_module(f"{pkg}.api.health.health")
    list_models = importlib.import_module(f"{pkg}.api.models.list_models")
    list_loras = importlib.import_module(f"{pkg}.api.models.list_loras")
    create_image = importlib.import_module(f"{pkg}.api.images.create_image")
    get_image = importlib.import_module(f"{pkg}.api.images.get_image")
    models = importlib.import_module(f"{pkg}.models")

    client = client_mod.AuthenticatedClient(base_url=BASE, token=KEY)
    h = health.sync(client=client)
    assert h.status.value == "healthy", h
    m = list_models.sync(client=client)
    assert m.object_ == "list" and len(m.data) == 1, m
    lo = list_loras.sync(client=client)
    assert lo.object_ == "list" and lo.enabled is False and lo.data == [], lo
    body = models.ImageGenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=1)
    r = create_image.sync(client=client, body=body)
    is_png(base64.b64decode(r.data[0].b64_json))
    body = models.ImageGenerationRequest(
        prompt=PROMPT, size="64x64", num_inference_steps=2, seed=1,
        response_format=models.ResponseFormat.URL,
    )
    r = create_image.sync(client=client, body=body)
    got = get_image.sync_detailed(image_id(r.data[0].url), client=client)
    assert got.status_code == 200, got
    is_png(got.content)
    body = models.ImageGenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=TOO_MANY_STEPS)
    r = create_image.sync_detailed(client=client, body=body)
    assert r.status_code == 400, r
    assert isinstance(r.parsed, models.ErrorResponse), r.parsed
    assert r.parsed.error.param == "num_inference_steps", r.parsed
    assert "between 1 and 4" in r.parsed.error.message, r.parsed
    r = list_models.sync_detailed(client=client_mod.Client(base_url=BASE))
    assert r.status_code == 401 and r.parsed.error.code == "missing_api_key", r
    assert r.parsed.error.param is None, r.parsed
    step("openapi-python-client: every route", start)


# ----------------------------------------------------------- OpenAPI Generator: python
def openapi_generator(generator, out):
    start = time.monotonic()
    extra = ["--package-name", "hypergen_gen"] if generator == "python" else []
    text = run(
        [os.path.join(VENV_BIN, "openapi-generator-cli"), "generate", "-i", SCHEMA,
         "-g", generator, "-o", out, *extra]
    )
    step(f"openapi-generator {generator}: generate", start)
    check_warnings(f"openapi-generator {generator}", text, r"\b(WARN|ERROR)\b")
    check_generated(f"openapi-generator {generator}", out, OPERATIONS + MODELS)


def openapi_generator_python():
    out = os.path.join(WORK, "gen-python")
    openapi_generator("python", out)
    start = time.monotonic()
    sys.path.insert(0, out)
    gen = importlib.import_module("hypergen_gen")
    api = gen.ApiClient(gen.Configuration(host=BASE, access_token=KEY))
    h = gen.HealthApi(api).health()
    assert h.status == gen.HealthStatus.HEALTHY, h
    m = gen.ModelsApi(api).list_models()
    assert m.object == "list" and len(m.data) == 1, m
    lo = gen.ModelsApi(api).list_loras()
    assert lo.object == "list" and lo.enabled is False and lo.data == [], lo
    images = gen.ImagesApi(api)
    r = images.create_image(gen.ImageGenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=1))
    is_png(base64.b64decode(r.data[0].b64_json))
    r = images.create_image(gen.ImageGenerationRequest(
        prompt=PROMPT, size="64x64", num_inference_steps=2, seed=1,
        response_format=gen.ResponseFormat.URL))
    is_png(images.get_image(image_id(r.data[0].url)))
    try:
        images.create_image(gen.ImageGenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=TOO_MANY_STEPS))
        sys.exit("openapi-generator python: no 400")
    except gen.ApiException as e:
        assert e.status == 400, e
        assert e.data.error.param == "num_inference_steps", e.data
        assert "between 1 and 4" in e.data.error.message, e.data
    try:
        gen.ModelsApi(gen.ApiClient(gen.Configuration(host=BASE))).list_models()
        sys.exit("openapi-generator python: no 401")
    except gen.ApiException as e:
        assert e.status == 401 and e.data.error.code == "missing_api_key", e
    step("openapi-generator python: every route", start)


# ------------------------------------------------------------------ TypeScript clients
def typescript():
    ts = os.path.join(WORK, "ts")
    os.makedirs(ts)
    openapi_generator("typescript-fetch", os.path.join(ts, "fetch-gen"))
    start = time.monotonic()
    text = run([os.path.join(NODE_BIN, "openapi-typescript"), SCHEMA, "-o", os.path.join(ts, "schema.ts")])
    step("openapi-typescript: generate", start)
    check_warnings("openapi-typescript", text, r"(?i)\bwarn")
    check_generated("openapi-typescript", os.path.join(ts, "schema.ts"), MODELS)
    for f in ("fetch_gen_client.ts", "openapi_fetch_client.ts", "tsconfig.json"):
        shutil.copy(os.path.join(HERE, f), ts)
    # The packages the clients import, from the tools folder.
    os.symlink(os.path.join(TOOLS, "node", "node_modules"), os.path.join(ts, "node_modules"))
    start = time.monotonic()
    # The defaults of a strict project: the generated code must type-check as it is.
    run([os.path.join(NODE_BIN, "tsc"), "-p", "tsconfig.json"], cwd=ts)
    step("tsc: type-check and compile both TypeScript clients", start)
    for client in ("fetch_gen_client", "openapi_fetch_client"):
        start = time.monotonic()
        out = run(["node", os.path.join("out", f"{client}.js"), BASE, KEY], cwd=ts)
        assert "OK" in out, out
        step(f"{client}: every route", start)


openapi_python_client()
openapi_generator_python()
typescript()
print("total %.1f s" % sum(t for _, t in timings))
print("sdk clients OK")
