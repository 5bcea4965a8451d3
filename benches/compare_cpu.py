#!/usr/bin/env python3
"""hypergen beside diffusers on the same CPU: one command, one run, one table and chart.

Rows (each measured on both sides, the same work with the same number of threads):

  fixture  the published tiny SDXL fixture (a diffusers folder, ``--fixture``), loaded by
           both sides from the same files: the whole pipeline at 128² (4 steps, CFG 5) and
           at 256² (30 steps, CFG 5), one UNet evaluation at 256² (2 rows: guidance) and
           one VAE decode at 256²;
  full     full-size SDXL base with random weights: diffusers builds it from the config
           files (``--config-dir``, ``from_config`` as compare_diffusers.py does), hypergen
           uses its built-in ``sdxl-base-1.0-random`` (the same architecture): one UNet
           evaluation (2 rows) and one VAE decode at 256² and 512², and both text
           encoders on one prompt.

diffusers side: float32, torch's CPU thread count (``--threads``, default torch's default,
which is the core count). Every row runs in a fresh Python subprocess that loads the model
(by default the whole pipeline, as hypergen holds it), resets its peak resident set
(``/proc/self/clear_refs``), runs ``--warmup`` untimed and ``--iters`` timed calls under
``torch.inference_mode()`` and reports the median and its own ``VmHWM``.

hypergen side: ``hypergen bench MODEL --device cpu --dtype float32 --threads N ... --json``,
as few invocations as the rows allow (one per model where the sizes need the same
components), read back from the JSON report (per-measurement median and peak RSS).
hypergen's UNet row is a step as its denoising loop runs it: the text's cross-attention
keys and values are projected once per generation (``prepare_context``), before the
timed calls; diffusers' ``unet(...)`` projects them in every call, as its loop does. The
pipeline rows time whole generations on both sides, that projection included.

``--rounds N`` repeats all of it N times, diffusers first in odd rounds and hypergen first
in even ones, and reports the median of the rounds' medians: on a shared machine whose
speed drifts over a run, neither side then gets only the quiet or only the busy half.

Prints one table (row, medians, ratio hypergen/diffusers, peak MiB of each side), writes
``--json`` with every number and the machine (CPU model and flags, cores, versions, date)
and draws ``--chart`` (PNG, matplotlib Agg).

    python benches/compare_cpu.py --json cpu.json --chart cpu.png
    python benches/compare_cpu.py --rounds 2 --json cpu.json          # each side first once
    python benches/compare_cpu.py --rows fixture --iters 3            # fixture rows only
    python benches/compare_cpu.py --rows full/unet-256 --iters 1      # one full-size row
    python benches/compare_cpu.py --list-rows
"""

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


# ---------------------------------------------------------------------------------- rows


@dataclass
class Row:
    id: str
    group: str  # "fixture" or "full"
    kind: str  # "pipeline", "unet", "vae", "text"
    label: str
    size: tuple = None  # (width, height); None for text
    steps: int = None  # pipeline rows
    guidance: float = 5.0
    result: dict = field(default_factory=dict)


def all_rows():
    return [
        Row("fixture/pipeline-128-4", "fixture", "pipeline", "fixture pipeline 128², 4 steps, CFG 5",
            (128, 128), 4),
        Row("fixture/pipeline-256-30", "fixture", "pipeline", "fixture pipeline 256², 30 steps, CFG 5",
            (256, 256), 30),
        Row("fixture/unet-256", "fixture", "unet", "fixture UNet step 256² (2 rows)", (256, 256)),
        Row("fixture/vae-256", "fixture", "vae", "fixture VAE decode 256²", (256, 256)),
        Row("full/unet-256", "full", "unet", "SDXL UNet step 256² (2 rows)", (256, 256)),
        Row("full/unet-512", "full", "unet", "SDXL UNet step 512² (2 rows)", (512, 512)),
        Row("full/vae-256", "full", "vae", "SDXL VAE decode 256²", (256, 256)),
        Row("full/vae-512", "full", "vae", "SDXL VAE decode 512²", (512, 512)),
        Row("full/text", "full", "text", "SDXL text encoders (1 prompt, both)"),
    ]


def select_rows(spec):
    """`fixture,full` (groups), row ids, or substrings of ids (`unet`, `full/vae`)."""
    rows = all_rows()
    if not spec or spec.strip() == "all":
        return rows
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    chosen = [r for r in rows if any(t == r.group or t == r.id or t in r.id for t in tokens)]
    unknown = [t for t in tokens if not any(t == r.group or t in r.id for r in rows)]
    if unknown:
        sys.exit(f"--rows: nothing matches {', '.join(unknown)} (see --list-rows)")
    return chosen


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="fixture,full",
                   help="comma list of groups (fixture, full), row ids or substrings of ids [fixture,full]")
    p.add_argument("--list-rows", action="store_true", help="print the row ids and exit")
    p.add_argument("--fixture", default=os.path.join(REPO, "..", "shared", "fixtures", "tiny-sdxl"),
                   help="diffusers folder of the fixture [../shared/fixtures/tiny-sdxl]")
    p.add_argument("--config-dir", default=os.path.join(REPO, "..", "shared", "configs", "sdxl-base-1.0"),
                   help="full-size SDXL config folder [../shared/configs/sdxl-base-1.0]")
    p.add_argument("--clip-dir", default=os.path.join(REPO, "assets", "clip"),
                   help="vocab.json and merges.txt for the full-size tokenizers [assets/clip]")
    p.add_argument("--hypergen", default=None,
                   help="hypergen binary [$CARGO_TARGET_DIR/release/hypergen, else target/release/hypergen, "
                        "else hypergen on PATH]")
    p.add_argument("--hypergen-full-model", default="sdxl-base-1.0-random",
                   help="hypergen's name for the full-size model [sdxl-base-1.0-random]")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides [torch's default: the core count]")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row [1]")
    p.add_argument("--iters", type=int, default=3, help="timed runs per row; the median is reported [3]")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every row this many times, each side first in every other round; the "
                        "table shows the median of the rounds' medians [1]")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--diffusers-load", choices=["pipeline", "component"], default="pipeline",
                   help="what each diffusers row holds in memory: the whole pipeline, as hypergen does "
                        "(peak RSS comparable), or only the component it times (less memory and "
                        "build time; the peak is then not comparable) [pipeline]")
    p.add_argument("--diffusers-init", choices=["fast", "torch"], default="fast",
                   help="random weights of the full-size diffusers model: `fast` skips torch's init and "
                        "fills PyTorch-default scales (uniform ±1/√fan_in, norms 1/0) by tiling a random "
                        "block, seconds instead of a minute per row; `torch` keeps torch's own init [fast]")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-hypergen", action="store_true")
    p.add_argument("--json", default=None, metavar="OUT", help="write every number and the machine here")
    p.add_argument("--chart", default=None, metavar="OUT.png", help="draw the table as a bar chart here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.rounds < 1:
        p.error("--warmup must be ≥ 0, --iters and --rounds ≥ 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be ≥ 1")
    return args


# ------------------------------------------------------------------------------- memory


def proc_status_bytes(key):
    """`VmHWM` / `VmRSS` of this process from /proc/self/status, bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Resets VmHWM to the current resident set, as hypergen bench does."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------- diffusers child (one row)


@contextlib.contextmanager
def skipped_torch_init():
    """Module constructors allocate their parameters but skip torch.nn.init (the fill
    comes after); buffers (position ids) are built as usual."""
    import torch

    names = ["uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
             "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
             "sparse_"]
    saved = {n: getattr(torch.nn.init, n) for n in names if hasattr(torch.nn.init, n)}
    try:  # transformers' own switch for `post_init` (its initialisers wrap torch's)
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    try:
        for n in saved:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        with no_init_weights():
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def fill_random(module, seed):
    """PyTorch-default scales as hypergen's random init uses them: weights and biases of
    linear/conv layers uniform ±1/√fan_in, norms γ = 1 and β = 0, embeddings ±0.02·√3
    (std 0.02). Values are tiled from one seeded random block: timing does not depend on
    them, only on their being finite, normal-sized numbers."""
    import torch

    g = torch.Generator().manual_seed(seed)
    block = torch.rand(1 << 22, generator=g) * 2 - 1
    n_block = block.numel()
    offset = 0

    def tile(p, scale):
        nonlocal offset
        flat = p.data.view(-1)
        i, n = 0, flat.numel()
        while i < n:
            start = offset % n_block
            k = min(n - i, n_block - start)
            torch.mul(block[start:start + k], scale, out=flat[i:i + k])
            i += k
            offset += k
        offset += 7919  # shift the next tensor against this one

    with torch.no_grad():
        for mod in module.modules():
            params = dict(mod.named_parameters(recurse=False))
            if not params:
                continue
            norm = isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)) or (
                "weight" in params and params["weight"].dim() == 1)
            emb = isinstance(mod, torch.nn.Embedding)
            w = params.get("weight")
            fan_in = w[0].numel() if w is not None and w.dim() >= 2 else None
            for name, p in params.items():
                if norm:
                    p.data.fill_(1.0 if name == "weight" else 0.0)
                elif emb:
                    tile(p, 0.02 * math.sqrt(3))
                elif fan_in:
                    tile(p, 1 / math.sqrt(fan_in))
                else:
                    tile(p, 0.02)


def vae_scale_factor(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def child_main(spec_path):
    """One diffusers row in this (fresh) process; writes its result as JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = torch.float32
    import diffusers
    import transformers

    def pretrained(cls, folder, **kw):
        """`from_pretrained` in float32 (`dtype=` in current releases, `torch_dtype=` before)."""
        try:
            return cls.from_pretrained(folder, dtype=dtype, **kw)
        except TypeError:
            return cls.from_pretrained(folder, torch_dtype=dtype, **kw)

    kind, model, load = spec["kind"], spec["model"], spec["load"]
    need = {"unet": {"unet"}, "vae": {"vae"}, "text": {"text"},
            "pipeline": {"unet", "vae", "text", "scheduler"}}[kind]
    if load == "pipeline":
        need = {"unet", "vae", "text", "scheduler"}
    t0 = time.perf_counter()
    parts = {}
    if model == "fixture":
        folder = spec["fixture"]
        if need == {"unet", "vae", "text", "scheduler"}:
            pipe = pretrained(diffusers.StableDiffusionXLPipeline, folder, add_watermarker=False)
            parts = {"unet": pipe.unet, "vae": pipe.vae, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2,
                     "tok1": pipe.tokenizer, "tok2": pipe.tokenizer_2, "scheduler": pipe.scheduler}
        else:
            if "unet" in need:
                parts["unet"] = pretrained(diffusers.UNet2DConditionModel, folder, subfolder="unet")
            if "vae" in need:
                parts["vae"] = pretrained(diffusers.AutoencoderKL, folder, subfolder="vae")
            if "text" in need:
                parts["te1"] = pretrained(transformers.CLIPTextModel, folder, subfolder="text_encoder")
                parts["te2"] = pretrained(transformers.CLIPTextModelWithProjection, folder,
                                                subfolder="text_encoder_2")
                parts["tok1"] = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
                parts["tok2"] = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        with open(os.path.join(folder, "vae", "config.json")) as f:
            vae_cfg = json.load(f)
        with open(os.path.join(folder, "unet", "config.json")) as f:
            unet_cfg = json.load(f)
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    else:
        cfg = spec["config_dir"]
        fast = spec["init"] == "fast"
        ctx = skipped_torch_init if fast else contextlib.nullcontext
        torch.manual_seed(0)
        if "unet" in need:
            with ctx():
                parts["unet"] = diffusers.UNet2DConditionModel.from_config(
                    diffusers.UNet2DConditionModel.load_config(os.path.join(cfg, "unet")))
            if fast:
                fill_random(parts["unet"], 1)
        if "vae" in need:
            with ctx():
                parts["vae"] = diffusers.AutoencoderKL.from_config(
                    diffusers.AutoencoderKL.load_config(os.path.join(cfg, "vae")))
            if fast:
                fill_random(parts["vae"], 2)
        if "text" in need:
            with ctx():
                parts["te1"] = transformers.CLIPTextModel(
                    transformers.CLIPTextConfig.from_json_file(os.path.join(cfg, "text_encoder", "config.json")))
                parts["te2"] = transformers.CLIPTextModelWithProjection(
                    transformers.CLIPTextConfig.from_json_file(os.path.join(cfg, "text_encoder_2", "config.json")))
            if fast:
                fill_random(parts["te1"], 3)
                fill_random(parts["te2"], 4)
            vocab = os.path.join(spec["clip_dir"], "vocab.json")
            merges = os.path.join(spec["clip_dir"], "merges.txt")
            parts["tok1"] = transformers.CLIPTokenizer(vocab, merges, model_max_length=77)
            parts["tok2"] = transformers.CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
        with open(os.path.join(cfg, "vae", "config.json")) as f:
            vae_cfg = json.load(f)
        with open(os.path.join(cfg, "unet", "config.json")) as f:
            unet_cfg = json.load(f)
        with open(os.path.join(cfg, "model_index.json")) as f:
            index = json.load(f)
        sched_path = os.path.join(cfg, "scheduler", "scheduler_config.json")
    if "scheduler" in need and "scheduler" not in parts:
        with open(sched_path) as f:
            sc = json.load(f)
        parts["scheduler"] = getattr(diffusers, sc["_class_name"]).from_config(sc)
    for m in ("unet", "vae", "te1", "te2"):
        if m in parts:
            parts[m].to(dtype).eval()
    pipe = None
    if "te1" in parts:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=parts.get("vae"), text_encoder=parts["te1"], text_encoder_2=parts["te2"],
            tokenizer=parts["tok1"], tokenizer_2=parts["tok2"], unet=parts.get("unet"),
            scheduler=parts.get("scheduler"),
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    params = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "te1", "te2") if k in parts}
    rss_after_load = proc_status_bytes("VmRSS")
    hwm_of_load = proc_status_bytes("VmHWM")

    guidance = spec["guidance"]
    cfg_on = guidance > 1.0
    rows = 2 if cfg_on else 1
    f = vae_scale_factor(vae_cfg)
    w, h = spec["size"] or (256, 256)
    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        unet = parts["unet"]
        cross = unet_cfg["cross_attention_dim"]
        cross = cross[0] if isinstance(cross, list) else cross
        pooled_dim = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        latents = torch.randn(rows, unet_cfg["in_channels"], h // f, w // f, generator=g)
        context = torch.randn(rows, 77, cross, generator=g)
        pooled = torch.randn(rows, pooled_dim, generator=g)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * rows, dtype=dtype)
        t = torch.tensor(500.0)
        fn = lambda: unet(latents, t, encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)
    elif kind == "vae":
        vae = parts["vae"]
        z = torch.randn(1, vae_cfg["latent_channels"], h // f, w // f, generator=g)
        sf = vae_cfg["scaling_factor"]
        fn = lambda: vae.decode(z / sf, return_dict=False)
    elif kind == "text":
        fn = lambda: pipe.encode_prompt(spec["prompt"], device=torch.device("cpu"), num_images_per_prompt=1,
                                        do_classifier_free_guidance=cfg_on)
    elif kind == "pipeline":
        fn = lambda: pipe(spec["prompt"], height=h, width=w, num_inference_steps=spec["steps"],
                          guidance_scale=guidance, num_images_per_prompt=1,
                          generator=torch.Generator().manual_seed(0), output_type="pil")
    else:
        raise ValueError(kind)

    rss_reset = reset_peak_rss()
    times = []
    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            out = fn()
            del out
        for _ in range(spec["iters"]):
            t1 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t1)
            del out
    result = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "mean_s": statistics.fmean(times),
        "times_s": times,
        "iters": len(times),
        "warmup": spec["warmup"],
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "rss_reset": rss_reset,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_of_load_bytes": hwm_of_load,
        "build_s": build_s,
        "holds": sorted(k for k in parts if k in ("unet", "vae", "te1", "te2")),
        "parameters": params,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    with open(spec["out"], "w") as fo:
        json.dump(result, fo, indent=1)


def run_diffusers_row(row, args, threads):
    """Runs one row in a fresh subprocess; returns its result dict (or {"error": ...})."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "kind": row.kind, "model": row.group, "size": row.size, "steps": row.steps, "guidance": row.guidance,
            "prompt": args.prompt, "threads": threads, "warmup": args.warmup, "iters": args.iters,
            "load": args.diffusers_load, "init": args.diffusers_init,
            "fixture": os.path.abspath(args.fixture), "config_dir": os.path.abspath(args.config_dir),
            "clip_dir": os.path.abspath(args.clip_dir), "out": os.path.join(tmp, "result.json"),
        }
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_path],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(spec["out"]):
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            return {"error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
        with open(spec["out"]) as f:
            out = json.load(f)
        out["wall_s"] = wall
        return out


# ------------------------------------------------------------------------------ hypergen


def find_hypergen(explicit):
    if explicit:
        return explicit
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release", "hypergen"))
    candidates.append(os.path.join(REPO, "target", "release", "hypergen"))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("hypergen")


def hypergen_version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or out.stderr.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def plan_hypergen(rows):
    """Invocations of `hypergen bench` for the rows of one model and guidance: sizes that
    need the same components and step counts share one invocation (hypergen times every
    component at every size of an invocation); text, which does not depend on the size,
    rides along with the first one."""
    by_size = {}
    text = False
    for r in rows:
        if r.kind == "text":
            text = True
            continue
        need = by_size.setdefault(r.size, (set(), set()))
        need[0].add(r.kind)
        if r.kind == "pipeline":
            need[1].add(r.steps)
    groups = {}
    for size, (comps, steps) in by_size.items():
        groups.setdefault((frozenset(comps), frozenset(steps)), []).append(size)
    plans = [{"sizes": sorted(sizes), "components": set(comps), "steps": sorted(steps) or [1]}
             for (comps, steps), sizes in groups.items()]
    if text:
        if plans:
            plans[0]["components"].add("text")
        else:
            plans.append({"sizes": [(256, 256)], "components": {"text"}, "steps": [1]})
    order = ["text", "unet", "scheduler", "vae", "pipeline"]
    for p in plans:
        p["components"] = [c for c in order if c in p["components"]]
    return plans


def run_hypergen(binary, model, plan, guidance, args, threads):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [binary, "bench", model, "--device", "cpu", "--dtype", "float32", "--threads", str(threads),
               "--size", ",".join(f"{w}x{h}" for w, h in plan["sizes"]),
               "--steps", ",".join(map(str, plan["steps"])), "--batch", "1", "--guidance", f"{guidance:g}",
               "--components", ",".join(plan["components"]), "--warmup", str(args.warmup),
               "--iters", str(args.iters), "--prompt", args.prompt, "--json", out]
        log("$ " + shlex.join(cmd))
        t0 = time.perf_counter()
        # hypergen's own table goes to our stderr: stdout keeps only the final table.
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(out):
            return {"command": cmd, "error": f"exit {proc.returncode}", "wall_s": wall}
        with open(out) as f:
            return {"command": cmd, "report": json.load(f), "wall_s": wall}


def hypergen_row_result(row, reports):
    """The measurement of `row` in hypergen's reports: (component, size, steps) match."""
    for rep in reports:
        if "report" not in rep:
            continue
        for m in rep["report"]["measurements"]:
            if m["component"] != row.kind or m["batch"] != 1:
                continue
            if row.kind != "text" and (m["width"], m["height"]) != tuple(row.size):
                continue
            if row.kind == "pipeline" and m["steps"] != row.steps:
                continue
            mem = m["memory"]
            t = m["timing"]
            return {"median_s": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"], "mean_s": t["mean_s"],
                    "iters": t["iters"], "peak_rss_bytes": mem.get("peak_rss_bytes"),
                    "rss_reset": mem.get("rss_reset"), "tflop": m.get("tflop"),
                    "achieved_tflops": m.get("achieved_tflops"), "unet_rows": m.get("unet_rows"),
                    "measured_at": [m["width"], m["height"]],
                    "rss_after_load_bytes": (rep["report"].get("model") or {}).get("memory_after_load", {})
                    .get("peak_rss_bytes")}
    errors = [rep["error"] for rep in reports if "error" in rep]
    return {"error": "; ".join(errors) or "not in hypergen's report"}


def measured_as(args):
    """How each figure was taken, for the table's and the chart's titles."""
    each = f"median of {args.iters} after {args.warmup} warm-up"
    if args.rounds == 1:
        return each
    return f"median over {args.rounds} rounds (sides alternating first) of the {each}"


def pool_rounds(results):
    """One side's measurements of one row over the rounds as one: the median of the
    rounds' medians, the extremes of their runs, the highest peak memory; each round's
    median and peak stay under "rounds". A row that failed in every round keeps the
    first error; failed rounds are otherwise left out."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    if len(results) == 1:
        return ok[0]
    pooled = dict(ok[0])
    pooled.update({
        "median_s": statistics.median(r["median_s"] for r in ok),
        "min_s": min(r["min_s"] for r in ok),
        "max_s": max(r["max_s"] for r in ok),
        "mean_s": statistics.fmean(r["mean_s"] for r in ok),
        "peak_rss_bytes": max((r.get("peak_rss_bytes") or 0) for r in ok) or None,
        "rounds": [{"median_s": r.get("median_s"), "peak_rss_bytes": r.get("peak_rss_bytes"),
                    "error": r.get("error")} for r in results],
    })
    if all("times_s" in r for r in ok):
        pooled["times_s"] = [t for r in ok for t in r["times_s"]]
    return pooled


# --------------------------------------------------------------------------------- machine


def machine_info(threads, binary, torch_mod):
    info = {"date": time.strftime("%Y-%m-%d", time.gmtime()),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "logical_cpus": os.cpu_count(), "threads": threads}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = flags = None
        cores = set()
        phys = core = None
        for line in text.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "model name" and model is None:
                model = v
            elif k == "flags" and flags is None:
                flags = v.split()
            elif k == "physical id":
                phys = v
            elif k == "core id":
                core = v
                cores.add((phys, core))
        info["cpu_model"] = model
        if cores:
            info["physical_cores"] = len(cores)
        if flags:
            interesting = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                           "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
                           "amx_int8", "amx_fp16", "hypervisor"]
            info["cpu_flags"] = [fl for fl in interesting if fl in flags]
    except OSError:
        info["cpu_model"] = platform.processor() or None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch_mod is not None:
        info["torch"] = torch_mod.__version__
        info["torch_default_threads"] = torch_mod.get_num_threads()
        try:
            info["torch_cpu_capability"] = torch_mod.backends.cpu.get_cpu_capability()
        except Exception:  # noqa: BLE001 (older torch)
            pass
        info["torch_mkldnn"] = bool(torch_mod.backends.mkldnn.is_available())
        for name in ("diffusers", "transformers"):
            try:
                info[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001
                info[name] = None
    if binary:
        info["hypergen"] = hypergen_version(binary)
        info["hypergen_binary"] = os.path.abspath(binary)
    return info


# ------------------------------------------------------------------------------ output


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fmt_s(s):
    if s is None:
        return "-"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def fmt_mib(b):
    return "-" if b is None else f"{b / MIB:.0f}"


def ratio(h, d):
    return None if h is None or d is None or d == 0 else h / d


def render_table(rows, machine, args):
    header = ["row", "diffusers", "hypergen", "ratio", "diffusers MiB", "hypergen MiB"]
    lines = []
    for r in rows:
        d, h = r.result.get("diffusers") or {}, r.result.get("hypergen") or {}
        rt = r.result.get("ratio")
        lines.append([r.label, fmt_s(d.get("median_s")) if "error" not in d else "failed",
                      fmt_s(h.get("median_s")) if "error" not in h else "failed",
                      "-" if rt is None else f"{rt:.2f}",
                      fmt_mib(d.get("peak_rss_bytes")), fmt_mib(h.get("peak_rss_bytes"))])
    widths = [max(len(x[i]) for x in lines + [header]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [f"hypergen vs diffusers on the CPU ({machine.get('cpu_model')}, {machine['threads']} threads, float32), "
           f"{machine['date']}; {measured_as(args)}",
           f"ratio = hypergen / diffusers time (below 1: hypergen faster); MiB = peak resident set during the row"
           + ("" if args.diffusers_load == "pipeline" else " (diffusers holds only the timed component)"),
           f"torch {machine.get('torch')}, diffusers {machine.get('diffusers')}, transformers "
           f"{machine.get('transformers')}; {machine.get('hypergen') or 'hypergen not run'}"
           + (" (DEBUG BUILD: not for real numbers)" if machine.get("hypergen_release_build") is False else ""),
           fmt(header), fmt(["-" * w for w in widths])]
    busy = machine.get("load_average_start")
    if busy is not None and busy > 0.25 * (machine.get("logical_cpus") or 1):
        out.insert(3, f"WARNING: load average {busy:.2f} at the start on {machine.get('logical_cpus')} CPUs: "
                      f"the machine was busy, times are unreliable")
    out += [fmt(x) for x in lines]
    return "\n".join(out)


def draw_chart(rows, machine, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    shown = [r for r in rows if (r.result.get("diffusers") or {}).get("median_s")
             or (r.result.get("hypergen") or {}).get("median_s")]
    if not shown:
        log("chart: no row has a number; not drawn")
        return
    n = len(shown)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 1.0 + 0.62 * n + 1.2), sharey=True,
                                     gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(n))[::-1]
    hgt = 0.38
    colors = {"diffusers": "#4C72B0", "hypergen": "#DD8452"}

    def panel(ax, key, scale, unit):
        vals = []
        for y, r in zip(ys, shown):
            d = (r.result.get("diffusers") or {}).get(key)
            h = (r.result.get("hypergen") or {}).get(key)
            d = d / scale if d else None
            h = h / scale if h else None
            if d:
                ax.barh(y + hgt / 2, d, hgt, color=colors["diffusers"])
            if h:
                ax.barh(y - hgt / 2, h, hgt, color=colors["hypergen"])
            vals += [v for v in (d, h) if v]
            rt = ratio(h, d)
            text = "-" if rt is None else f"×{rt:.2f}"
            ax.annotate(text, xy=(max(v for v in (d, h) if v), y), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=9, fontweight="bold",
                        color="#2a7a2a" if rt is not None and rt < 1 else "#a02020")
        ax.set_xscale("log")
        if vals:
            lo = 10 ** math.floor(math.log10(min(vals) / 1.5))
            hi = max(vals) * 3.5
            ax.set_xlim(lo, hi)
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            # Few decades: label the 2…9 ticks too, else only the powers of ten.
            ax.xaxis.set_minor_formatter(plain if hi / lo < 30 else ticker.NullFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(unit)
        ax.grid(axis="x", which="both", alpha=0.25)

    panel(ax_t, "median_s", 1.0, "median seconds (log)  —  ×: hypergen / diffusers")
    panel(ax_m, "peak_rss_bytes", MIB, "peak resident MiB (log)")
    ax_t.set_yticks(ys)
    ax_t.set_yticklabels([r.label for r in shown])
    from matplotlib.patches import Patch

    ax_t.legend(handles=[Patch(color=colors["diffusers"], label="diffusers (PyTorch)"),
                         Patch(color=colors["hypergen"], label="hypergen (Burn CPU)")],
                loc="lower right", fontsize=9)
    debug = " — hypergen DEBUG build" if machine.get("hypergen_release_build") is False else ""
    busy = machine.get("load_average_start")
    if busy is not None and busy > 0.25 * (machine.get("logical_cpus") or 1):
        debug += f" — busy machine (load {busy:.1f})"
    fig.suptitle(f"hypergen vs diffusers, CPU float32: {machine.get('cpu_model')}, {machine['threads']} threads, "
                 f"{machine['date']}{debug}", fontsize=11)
    ax_t.set_title(f"torch {machine.get('torch')}, diffusers {machine.get('diffusers')}; "
                   f"{machine.get('hypergen') or ''}; {measured_as(args)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    if args.list_rows:
        for r in all_rows():
            print(f"{r.id:26} {r.label}")
        return
    rows = select_rows(args.rows)
    groups = [g for g in ("fixture", "full") if any(r.group == g for r in rows)]
    if "fixture" in groups and not os.path.isfile(os.path.join(args.fixture, "model_index.json")):
        sys.exit(f"no fixture at {args.fixture} (pass --fixture DIR)")
    if "full" in groups and not os.path.isfile(os.path.join(args.config_dir, "unet", "config.json")):
        sys.exit(f"no SDXL configs at {args.config_dir} (pass --config-dir DIR)")

    torch_mod = None
    if not args.skip_diffusers or args.threads is None:
        import torch as torch_mod  # versions and the default thread count only; rows run in children
    threads = args.threads or torch_mod.get_num_threads()

    binary = None
    if not args.skip_hypergen:
        binary = find_hypergen(args.hypergen)
        if not binary:
            sys.exit("no hypergen binary: build it (cargo build --release) or pass --hypergen PATH")
    machine = machine_info(threads, binary, torch_mod)
    log(f"machine: {json.dumps(machine)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine["load_average_start"] = load
    if load is not None and load > 0.25 * (os.cpu_count() or 1):
        log(f"warning: load average {load:.2f} on {os.cpu_count()} CPUs: the machine is busy, times will be "
            f"unreliable (multi-threaded runs suffer most when cores are shared)")

    reports = []
    for group in groups:
        grows = [r for r in rows if r.group == group]
        measured = {r.id: {"diffusers": [], "hypergen": []} for r in grows}
        for rnd in range(args.rounds):
            # Each side goes first in every other round: drift in the machine's speed over
            # the run (other tenants, thermals) then weighs on both alike.
            sides = ("diffusers", "hypergen") if rnd % 2 == 0 else ("hypergen", "diffusers")
            if args.rounds > 1:
                log(f"{group}: round {rnd + 1} of {args.rounds} ({' first, then '.join(sides)})")
            for side in sides:
                if side == "diffusers" and not args.skip_diffusers:
                    for r in grows:
                        log(f"diffusers {r.id} ...")
                        res = run_diffusers_row(r, args, threads)
                        measured[r.id]["diffusers"].append(res)
                        if "error" in res:
                            log(f"diffusers {r.id} FAILED ({res['wall_s']:.0f} s): {res['error']}")
                        else:
                            log(f"diffusers {r.id}: {fmt_s(res['median_s'])}, peak {fmt_mib(res['peak_rss_bytes'])} "
                                f"MiB (built in {res['build_s']:.1f} s, {res['wall_s']:.0f} s in all)")
                if side == "hypergen" and not args.skip_hypergen:
                    model = os.path.abspath(args.fixture) if group == "fixture" else args.hypergen_full_model
                    greps = []
                    for guidance in sorted({r.guidance for r in grows}):
                        for plan in plan_hypergen([r for r in grows if r.guidance == guidance]):
                            rep = run_hypergen(binary, model, plan, guidance, args, threads)
                            rep["group"] = group
                            rep["round"] = rnd + 1
                            greps.append(rep)
                            if "error" in rep:
                                log(f"hypergen {group} FAILED: {rep['error']}")
                    reports += greps
                    for r in grows:
                        h = hypergen_row_result(r, greps)
                        measured[r.id]["hypergen"].append(h)
                        if "error" not in h:
                            log(f"hypergen {r.id}: {fmt_s(h['median_s'])}, peak {fmt_mib(h['peak_rss_bytes'])} MiB")
        for r in grows:
            for side, results in measured[r.id].items():
                if results:
                    r.result[side] = pool_rounds(results)
            d, h = r.result.get("diffusers") or {}, r.result.get("hypergen") or {}
            r.result["ratio"] = ratio(h.get("median_s"), d.get("median_s"))
            r.result["memory_ratio"] = ratio(h.get("peak_rss_bytes"), d.get("peak_rss_bytes"))

    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = os.getloadavg()[0]
    builds = [rep["report"]["device"].get("release_build") for rep in reports if "report" in rep]
    if builds:
        machine["hypergen_release_build"] = all(builds)
        machine["hypergen_host_cpu"] = next(rep["report"]["device"].get("host_cpu")
                                            for rep in reports if "report" in rep)

    print()
    print(render_table(rows, machine, args))

    if args.json:
        out = {
            "machine": machine,
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "rows": [{"id": r.id, "group": r.group, "kind": r.kind, "label": r.label,
                      "size": list(r.size) if r.size else None, "steps": r.steps, "guidance": r.guidance,
                      "batch": 1, "unet_rows": (2 if r.guidance > 1 else 1) if r.kind == "unet" else None,
                      **r.result} for r in rows],
            "hypergen_runs": reports,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        log(f"wrote {args.json}")
    if args.chart:
        draw_chart(rows, machine, args, args.chart)


if __name__ == "__main__":
    main()
