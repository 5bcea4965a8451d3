#!/usr/bin/env python3
"""Image-to-image and inpainting references for the samplers of issue 28.

The fixture's `reference/extras` covers edits with its own (Euler) scheduler only. This
computes the same kind of runs with diffusers' newer samplers, as diffusers runs them:
`StableDiffusionXLImg2ImgPipeline` / `StableDiffusionXLInpaintPipeline` from the fixture
folder (float32, CPU, `requires_aesthetics_score=False`), the scheduler replaced by
`Cls.from_config(pipe.scheduler.config, **overrides)`, the input image and mask of
`reference/extras`, its prompt, `generator=torch.Generator("cpu").manual_seed(SEED)`.

Output (next to this script's `--out`, default tests/references/sampler_edits/):
  references.safetensors  CASE.latents (final, before the VAE), CASE.image_u8 ([H, W, 3])
  cases.json              each case's settings, the versions used, and the SHA-256 of
                          every fixture file read (the test refuses other fixtures)

Run with diffusers 0.42.1 and torch 2.15 (the fixture's versions):
  python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch diffusers==0.42.1 \
      transformers safetensors pillow
  HYPERGEN_FIXTURE_DIR=../shared/fixtures/tiny-sdxl /tmp/ref/bin/python \
      scripts/references/sampler_edits.py
"""

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    TCDScheduler,
    UniPCMultistepScheduler,
)

# name: (pipeline, scheduler class, overrides, strength, steps, guidance, seed, eta,
#        the equivalent `hypergen generate` options)
CASES = {
    "img2img.heun.s0.5.steps4.seed7": (
        "img2img", HeunDiscreteScheduler, {}, 0.5, 4, 5.0, 7, None,
        ["--scheduler", "heun"]),
    "img2img.dpmpp_2m_sde_karras.s0.75.steps4.seed11": (
        "img2img", DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        0.75, 4, 5.0, 11, None, ["--scheduler", "dpmpp_2m_sde_karras"]),
    "img2img.tcd.s0.6.steps5.seed3": (
        "img2img", TCDScheduler, {}, 0.6, 5, 5.0, 3, 0.3,
        ["--scheduler", "tcd", "--eta", "0.3"]),
    "inpaint.unipc.s0.8.steps5.seed9": (
        "inpaint", UniPCMultistepScheduler, {}, 0.8, 5, 5.0, 9, None,
        ["--scheduler", "unipc"]),
}

FIXTURE_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "reference/extras/extras.json",
    "reference/extras/init_image.png",
    "reference/extras/mask.png",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default=os.environ.get("HYPERGEN_FIXTURE_DIR"))
    parser.add_argument("--out", default=str(here.parent.parent / "tests/references/sampler_edits"))
    args = parser.parse_args()
    fixture = Path(args.fixture or here.parent.parent.parent / "shared/fixtures/tiny-sdxl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extras = fixture / "reference/extras"
    prompt = json.loads((extras / "extras.json").read_text())["prompt"]
    image = Image.open(extras / "init_image.png").convert("RGB")
    mask = Image.open(extras / "mask.png")

    torch.set_grad_enabled(False)
    pipes = {
        "img2img": StableDiffusionXLImg2ImgPipeline.from_pretrained(
            fixture, torch_dtype=torch.float32, requires_aesthetics_score=False),
        "inpaint": StableDiffusionXLInpaintPipeline.from_pretrained(
            fixture, torch_dtype=torch.float32, requires_aesthetics_score=False),
    }
    # Every case starts from the fixture's own scheduler config, as a user's
    # `Cls.from_config(pipe.scheduler.config)` does.
    fixture_config = {kind: pipe.scheduler.config for kind, pipe in pipes.items()}
    tensors, cases = {}, {}
    for name, (kind, cls, overrides, strength, steps, guidance, seed, eta, cli) in CASES.items():
        pipe = pipes[kind]
        pipe.scheduler = cls.from_config(fixture_config[kind], **overrides)
        kwargs = dict(
            prompt=prompt, image=image, strength=strength, num_inference_steps=steps,
            guidance_scale=guidance, height=image.height, width=image.width)
        if kind == "inpaint":
            kwargs["mask_image"] = mask
        if eta is not None:
            kwargs["eta"] = eta
        latents = pipe(**kwargs, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(seed)).images
        pil = pipe(**kwargs, output_type="pil",
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        tensors[f"{name}.latents"] = latents.contiguous()
        tensors[f"{name}.image_u8"] = torch.from_numpy(np.array(pil, dtype=np.uint8)).contiguous()
        cases[name] = {
            "pipeline": type(pipe).__name__,
            "scheduler": cls.__name__,
            "overrides": overrides,
            "strength": strength,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "eta": eta,
            "generator": f"torch.Generator('cpu').manual_seed({seed})",
            "mask": "reference/extras/mask.png (white = repaint)" if kind == "inpaint" else None,
            "cli": cli,
        }
        print(name, "done")
    save_file(tensors, out / "references.safetensors")
    meta = {
        "prompt": prompt,
        "image": "reference/extras/init_image.png",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        "fixture_sha256": {f: sha256(fixture / f) for f in FIXTURE_FILES if (fixture / f).exists()},
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
