#!/usr/bin/env python3
"""hypergen beside diffusers on the same device, in one run.

diffusers side: StableDiffusionXLPipeline built from the SDXL config files with random
weights (``from_config`` / transformers ``CLIPTextConfig``), tokenizers from the CLIP
vocabulary and merges in ``assets/clip/``, PyTorch SDPA attention, the same scheduler,
sizes, steps, guidance and dtype. Timed with ``torch.cuda.synchronize()`` around each
run after warm-up runs; peak memory from ``torch.cuda.max_memory_allocated/reserved``.

hypergen side: ``hypergen bench MODEL ... --json FILE`` once per ``--hypergen-devices``
entry (CUDA and Vulkan by default), read back from its JSON report.

Prints one table with hypergen/diffusers ratios per configuration (below 1: hypergen
takes less time / memory; for images/s above 1 is better) and writes everything to
``--json``.

On a GPU machine (no network; diffusers/transformers installed from carried wheels, the
hypergen binary carried; see BENCHMARKS.md):

    python benches/compare_diffusers.py --hypergen ./hypergen --turbo --json cmp.json

Checking it on a CPU with the tiny config (seconds):

    python benches/compare_diffusers.py --device cpu --dtype float32 \\
        --config-dir presets/tiny-sdxl --hypergen-model tiny-sdxl-random \\
        --hypergen-devices cpu --sizes 64 --steps 2 --batch 1,2
"""

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counts(s):
    return [int(x) for x in s.split(",") if x.strip()]


def sizes(s):
    out = []
    for item in s.split(","):
        item = item.strip().lower()
        w, _, h = item.partition("x")
        out.append((int(w), int(h or w)))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default=os.path.join(REPO, "..", "shared", "configs", "sdxl-base-1.0"),
                   help="SDXL config folder (model_index.json, unet/, vae/, text_encoder*/, scheduler/)")
    p.add_argument("--turbo-scheduler", default=os.path.join(REPO, "..", "shared", "configs", "sdxl-turbo",
                                                             "scheduler", "scheduler_config.json"),
                   help="scheduler config of SDXL-Turbo (for --turbo)")
    p.add_argument("--clip-dir", default=os.path.join(REPO, "assets", "clip"), help="vocab.json and merges.txt")
    p.add_argument("--device", default="cuda", help="torch device of the diffusers side: cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--sizes", type=sizes, default=sizes("512,1024"), help="N or WxH, comma-separated")
    p.add_argument("--steps", type=counts, default=[30], help="denoising steps, comma-separated")
    p.add_argument("--batch", type=counts, default=[1], help="images per run, comma-separated")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--turbo", action="store_true", help="also SDXL-Turbo: --turbo-sizes, --turbo-steps, no guidance")
    p.add_argument("--turbo-sizes", type=sizes, default=sizes("512"))
    p.add_argument("--turbo-steps", type=counts, default=[1, 2, 3, 4])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--hypergen", default=None, help="hypergen binary [target/release/hypergen, else on PATH]")
    p.add_argument("--hypergen-devices", default=None,
                   help="comma list of hypergen --device values [cuda,vulkan; cpu with --device cpu]")
    p.add_argument("--hypergen-model", default="sdxl-base-1.0-random")
    p.add_argument("--hypergen-turbo-model", default="sdxl-turbo-random")
    p.add_argument("--hypergen-env", action="append", default=[], metavar="K=V",
                   help="environment for hypergen runs, e.g. HYPERGEN_KERNELS=none (repeatable)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-hypergen", action="store_true")
    p.add_argument("--json", default=None, help="write every number here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- diffusers


def nvidia_driver():
    """The NVIDIA driver version, from nvidia-smi when it is there."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


class Diffusers:
    """A random-weight SDXL pipeline built from config files."""

    def __init__(self, args):
        import torch
        import diffusers
        import transformers

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        cfg = args.config_dir
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.device(self.device):
            unet = diffusers.UNet2DConditionModel.from_config(
                diffusers.UNet2DConditionModel.load_config(os.path.join(cfg, "unet")))
            vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(os.path.join(cfg, "vae")))
            te1 = transformers.CLIPTextModel(
                transformers.CLIPTextConfig.from_json_file(os.path.join(cfg, "text_encoder", "config.json")))
            te2 = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig.from_json_file(os.path.join(cfg, "text_encoder_2", "config.json")))
        vocab = os.path.join(args.clip_dir, "vocab.json")
        merges = os.path.join(args.clip_dir, "merges.txt")
        tok1 = transformers.CLIPTokenizer(vocab, merges, model_max_length=77)
        tok2 = transformers.CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
        with open(os.path.join(cfg, "model_index.json")) as f:
            index = json.load(f)
        self.base_scheduler = self._scheduler(os.path.join(cfg, "scheduler", "scheduler_config.json"))
        self.pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
            scheduler=self.base_scheduler,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
        self.pipe.to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.build_s = time.perf_counter() - t0
        procs = {type(p).__name__ for p in unet.attn_processors.values()}
        self.info = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "attention_processors": sorted(procs),
            "build_s": self.build_s,
            "parameters": {name: sum(p.numel() for p in m.parameters())
                           for name, m in [("text_encoder", te1), ("text_encoder_2", te2), ("unet", unet),
                                           ("vae", vae)]},
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.info.update(gpu=props.name, cuda=torch.version.cuda,
                             gpu_memory_gib=round(props.total_memory / 2**30, 1), driver=nvidia_driver())

    @staticmethod
    def _scheduler(path):
        import diffusers

        with open(path) as f:
            config = json.load(f)
        return getattr(diffusers, config["_class_name"]).from_config(config)

    def use_scheduler(self, path):
        self.pipe.scheduler = self._scheduler(path) if path else self.base_scheduler

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_memory(self):
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def memory(self):
        if self.device.type == "cuda":
            return {"allocated_bytes": self.torch.cuda.max_memory_allocated(self.device),
                    "reserved_bytes": self.torch.cuda.max_memory_reserved(self.device)}
        import resource

        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def timed(self, fn):
        warmup, iters = self.args.warmup, self.args.iters
        self.reset_memory()
        with self.torch.inference_mode():
            for _ in range(warmup):
                fn()
                self.sync()
            times = []
            for _ in range(iters):
                self.sync()
                t = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t)
        return {"median_s": statistics.median(times), "min_s": min(times), "iters": iters,
                "memory": self.memory()}

    def components(self, width, height, batch, guidance):
        """Text encoding, one UNet evaluation, one VAE decode (in float32 when the VAE
        config forces upcasting, as the pipeline decodes), at one size and batch."""
        torch, pipe = self.torch, self.pipe
        cfg_on = guidance > 1.0
        out = {}
        out["text"] = self.timed(lambda: pipe.encode_prompt(
            self.args.prompt, device=self.device, num_images_per_prompt=batch,
            do_classifier_free_guidance=cfg_on))
        with torch.inference_mode():
            pe, npe, pooled, npooled = pipe.encode_prompt(
                self.args.prompt, device=self.device, num_images_per_prompt=batch,
                do_classifier_free_guidance=cfg_on)
        if cfg_on:
            pe, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])
        rows = pe.shape[0]
        f = pipe.vae_scale_factor
        latents = torch.randn(rows, pipe.unet.config.in_channels, height // f, width // f,
                              device=self.device, dtype=self.dtype)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * rows, device=self.device,
                                dtype=self.dtype)
        t = torch.tensor(500.0, device=self.device)
        out["unet"] = self.timed(lambda: pipe.unet(
            latents, t, encoder_hidden_states=pe,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False))
        vae = pipe.vae
        upcast = self.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        z = torch.randn(batch, vae.config.latent_channels, height // f, width // f, device=self.device,
                        dtype=vae.dtype)
        out["vae"] = self.timed(lambda: vae.decode(z / vae.config.scaling_factor, return_dict=False))
        if upcast:
            vae.to(self.dtype)
        return out

    def pipeline(self, width, height, batch, steps, guidance):
        return self.timed(lambda: self.pipe(
            self.args.prompt, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance, num_images_per_prompt=batch, output_type="pil"))


# ------------------------------------------------------------------------------ hypergen


def find_hypergen(explicit):
    if explicit:
        return explicit
    built = os.path.join(REPO, "target", "release", "hypergen")
    if os.path.exists(built):
        return built
    found = shutil.which("hypergen")
    if not found:
        sys.exit("no hypergen binary: pass --hypergen PATH")
    return found


def run_hypergen(binary, device, model, args, size_list, steps, guidance, env_extra):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [binary, "bench", model, "--device", device, "--dtype", args.dtype,
               "--size", ",".join(f"{w}x{h}" for w, h in size_list),
               "--steps", ",".join(map(str, steps)), "--batch", ",".join(map(str, args.batch)),
               "--guidance", str(guidance), "--warmup", str(args.warmup), "--iters", str(args.iters),
               "--prompt", args.prompt, "--json", out]
        env = dict(os.environ)
        env.update(kv.split("=", 1) for kv in env_extra)
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            print(f"hypergen on {device} failed (exit {proc.returncode})", file=sys.stderr)
            return None
        with open(out) as f:
            return json.load(f)


def hypergen_numbers(report):
    """{(component, w, h, batch, steps): {median_s, memory}} from a hypergen JSON report."""
    out = {}
    for m in report["measurements"]:
        mem = m["memory"]
        peak = mem.get("device_reserved_bytes") or mem.get("peak_rss_bytes")
        out[(m["component"], m["width"], m["height"], m["batch"], m["steps"])] = {
            "median_s": m["timing"]["median_s"], "min_s": m["timing"]["min_s"], "peak_bytes": peak}
    return out


# --------------------------------------------------------------------------------- table


def fmt_s(s):
    if s is None:
        return "-"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def fmt_b(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def ratio(h, d):
    return None if h is None or d is None or d == 0 else h / d


def main(argv=None):
    args = parse_args(argv)
    cpu = args.device.startswith("cpu")
    hdevices = (args.hypergen_devices or ("cpu" if cpu else "cuda,vulkan")).split(",")
    # (label, sizes, steps, guidance, diffusers scheduler config or None, hypergen model)
    plans = [("base", args.sizes, args.steps, args.guidance, None, args.hypergen_model)]
    if args.turbo:
        plans.append(("turbo", args.turbo_sizes, args.turbo_steps, 0.0, args.turbo_scheduler,
                      args.hypergen_turbo_model))

    diff = None
    dres = {}
    if not args.skip_diffusers:
        diff = Diffusers(args)
        print(f"diffusers pipeline built in {diff.build_s:.1f} s: {json.dumps(diff.info)}", flush=True)
        for label, size_list, steps_list, guidance, sched, _ in plans:
            diff.use_scheduler(sched)
            for w, h in size_list:
                for b in args.batch:
                    for comp, r in diff.components(w, h, b, guidance).items():
                        dres[(label, comp, w, h, b, None)] = r
                        print(f"diffusers {label} {comp} {w}x{h} b{b}: {fmt_s(r['median_s'])}", flush=True)
                    for s in steps_list:
                        r = diff.pipeline(w, h, b, s, guidance)
                        dres[(label, "pipeline", w, h, b, s)] = r
                        print(f"diffusers {label} pipeline {w}x{h} b{b} {s} steps: {fmt_s(r['median_s'])}",
                              flush=True)
        # Hand the GPU to hypergen: drop every diffusers tensor first.
        del diff.pipe, diff.base_scheduler
        gc.collect()
        if not cpu:
            diff.torch.cuda.empty_cache()

    hres = {}
    reports = {}
    if not args.skip_hypergen:
        binary = find_hypergen(args.hypergen)
        for dev in hdevices:
            for label, size_list, steps_list, guidance, _, model in plans:
                rep = run_hypergen(binary, dev, model, args, size_list, steps_list, guidance, args.hypergen_env)
                reports[(dev, label)] = rep
                if rep is None:
                    continue
                for (comp, w, h, b, s), v in hypergen_numbers(rep).items():
                    hres[(dev, label, comp, w, h, b, s)] = v

    # One table: per configuration, each metric for diffusers and every hypergen device.
    header = ["config", "metric", "diffusers"]
    for dev in hdevices:
        header += [f"hypergen {dev}", "ratio"]
    rows = []

    def d_peak(r):
        if r is None:
            return None
        m = r["memory"]
        return m.get("reserved_bytes", m.get("peak_rss_bytes"))

    results = []
    for label, size_list, steps_list, guidance, _, _ in plans:
        for w, h in size_list:
            for b in args.batch:
                for s in steps_list:
                    name = f"{label} {w}x{h} b{b} {s} steps" + (f" cfg {guidance:g}" if guidance > 1 else "")
                    metrics = [("text encode", "text", None), ("unet step", "unet", None),
                               ("vae decode", "vae", None), ("end to end", "pipeline", s)]
                    entry = {"config": name, "plan": label, "width": w, "height": h, "batch": b, "steps": s,
                             "guidance": guidance, "metrics": {}}
                    for title, comp, st in metrics:
                        d = dres.get((label, comp, w, h, b, st))
                        dv = d["median_s"] if d else None
                        row = [name, title, fmt_s(dv)]
                        entry["metrics"][comp] = {"diffusers_s": dv}
                        for dev in hdevices:
                            hv = hres.get((dev, label, comp, w, h, b, st))
                            hv = hv["median_s"] if hv else None
                            r = ratio(hv, dv)
                            row += [fmt_s(hv), "-" if r is None else f"{r:.2f}"]
                            entry["metrics"][comp][f"hypergen_{dev}_s"] = hv
                            entry["metrics"][comp][f"ratio_{dev}"] = r
                        rows.append(row)
                        name = ""
                    d = dres.get((label, "pipeline", w, h, b, s))
                    dips = b / d["median_s"] if d else None
                    row = ["", "images/s", "-" if dips is None else f"{dips:.3f}"]
                    entry["metrics"]["images_per_s"] = {"diffusers": dips}
                    for dev in hdevices:
                        hv = hres.get((dev, label, "pipeline", w, h, b, s))
                        hips = b / hv["median_s"] if hv else None
                        r = ratio(hips, dips)
                        row += ["-" if hips is None else f"{hips:.3f}", "-" if r is None else f"{r:.2f}"]
                        entry["metrics"]["images_per_s"][f"hypergen_{dev}"] = hips
                    rows.append(row)
                    dp = d_peak(d)
                    row = ["", "peak memory", fmt_b(dp)]
                    entry["metrics"]["peak_memory"] = {"diffusers_bytes": dp}
                    for dev in hdevices:
                        hv = hres.get((dev, label, "pipeline", w, h, b, s))
                        hp = hv["peak_bytes"] if hv else None
                        r = ratio(hp, dp)
                        row += [fmt_b(hp), "-" if r is None else f"{r:.2f}"]
                        entry["metrics"]["peak_memory"][f"hypergen_{dev}_bytes"] = hp
                    rows.append(row)
                    results.append(entry)

    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i])
                               for i, c in enumerate(r))
    print()
    print(f"hypergen vs diffusers on {args.device} ({args.dtype}); ratio = hypergen / diffusers "
          f"(times and memory: below 1 is better for hypergen; images/s: above 1)")
    if diff is not None:
        print(f"diffusers {diff.info['diffusers']}, torch {diff.info['torch']}, "
              f"attention {','.join(diff.info['attention_processors'])}"
              + (f", {diff.info['gpu']}, CUDA {diff.info['cuda']}, driver {diff.info.get('driver')}"
                 if "gpu" in diff.info else ""))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))

    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "host": platform.node(),
            "args": {k: v for k, v in vars(args).items()},
            "diffusers": diff.info if diff else None,
            "results": results,
            "hypergen_reports": {f"{dev}/{label}": rep for (dev, label), rep in reports.items()},
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
