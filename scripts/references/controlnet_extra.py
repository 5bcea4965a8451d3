#!/usr/bin/env python3
"""ControlNet references beyond the fixture's `reference/controlnet` (issue 29).

The fixture covers ControlNet text-to-image and image-to-image with its own (Euler)
scheduler. This computes, as diffusers runs them, ControlNet inpainting
(`StableDiffusionXLControlNetInpaintPipeline`, the 4-channel base UNet) and ControlNet
text-to-image with another sampler (DPM++ 2M Karras) and in guess mode, from the fixture folder and its
`controlnets/tiny-canny` (float32, CPU), the control image and prompt of
`reference/controlnet`, the image and mask of `reference/extras`,
`generator=torch.Generator("cpu").manual_seed(SEED)`.

Output (default tests/references/controlnet_extra/):
  references.safetensors  CASE.latents (final, before the VAE), CASE.image_u8 ([H, W, 3])
  cases.json              each case's settings, the versions used, and the SHA-256 of
                          every fixture file read (the test refuses other fixtures)

Run with diffusers 0.42.1 and torch (the fixture's versions):
  HYPERGEN_FIXTURE_DIR=../shared/fixtures/tiny-sdxl /work/pyref/bin/python \
      scripts/references/controlnet_extra.py
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
    ControlNetModel,
    DPMSolverMultistepScheduler,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)

CONTROLNET = "controlnets/tiny-canny"
CONTROL_IMAGE = "reference/controlnet/control_canny.png"

# name: (pipeline, scheduler overrides or None, strength, steps, guidance, seed, scale,
#        guidance_end, guess_mode, the equivalent `hypergen generate` options)
CASES = {
    "inpaint.canny.s0.8.seed9": (
        "inpaint", None, 0.8, 5, 5.0, 9, 0.7, 1.0, False, []),
    "txt2img.canny.dpmpp_2m_karras.seed21": (
        "txt2img", {"use_karras_sigmas": True}, None, 5, 5.0, 21, 1.0, 0.8, False,
        ["--scheduler", "dpmpp_2m_karras"]),
    "txt2img.canny.guess_mode.seed33": (
        "txt2img", None, None, 4, 4.0, 33, 0.9, 1.0, True, ["--control-guess-mode"]),
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
    CONTROLNET + "/config.json",
    CONTROLNET + "/diffusion_pytorch_model.safetensors",
    CONTROL_IMAGE,
    "reference/controlnet/controlnet.json",
    "reference/extras/init_image.png",
    "reference/extras/mask.png",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default=os.environ.get("HYPERGEN_FIXTURE_DIR"))
    parser.add_argument("--out", default=str(here.parent.parent / "tests/references/controlnet_extra"))
    args = parser.parse_args()
    fixture = Path(args.fixture or here.parent.parent.parent / "shared/fixtures/tiny-sdxl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt = json.loads((fixture / "reference/controlnet/controlnet.json").read_text())["prompt"]
    control = Image.open(fixture / CONTROL_IMAGE).convert("RGB")
    image = Image.open(fixture / "reference/extras/init_image.png").convert("RGB")
    mask = Image.open(fixture / "reference/extras/mask.png")

    torch.set_grad_enabled(False)
    controlnet = ControlNetModel.from_pretrained(fixture / CONTROLNET, torch_dtype=torch.float32)
    pipes = {
        "inpaint": StableDiffusionXLControlNetInpaintPipeline.from_pretrained(
            fixture, controlnet=controlnet, torch_dtype=torch.float32,
            requires_aesthetics_score=False),
        "txt2img": StableDiffusionXLControlNetPipeline.from_pretrained(
            fixture, controlnet=controlnet, torch_dtype=torch.float32),
    }
    tensors, cases = {}, {}
    fixture_scheduler = {kind: pipe.scheduler for kind, pipe in pipes.items()}
    for name, (kind, overrides, strength, steps, guidance, seed, scale, end, guess, cli) in CASES.items():
        pipe = pipes[kind]
        pipe.scheduler = fixture_scheduler[kind]
        if overrides is not None:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **overrides)
        kwargs = dict(
            prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
            height=control.height, width=control.width,
            controlnet_conditioning_scale=scale, control_guidance_start=0.0,
            control_guidance_end=end, guess_mode=guess)
        if kind == "inpaint":
            kwargs.update(image=image, mask_image=mask, control_image=control, strength=strength)
        else:
            kwargs.update(image=control)
        latents = pipe(**kwargs, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(seed)).images
        pil = pipe(**kwargs, output_type="pil",
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        tensors[f"{name}.latents"] = latents.contiguous()
        tensors[f"{name}.image_u8"] = torch.from_numpy(np.array(pil, dtype=np.uint8)).contiguous()
        cases[name] = {
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "overrides": overrides,
            "strength": strength,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": f"torch.Generator('cpu').manual_seed({seed})",
            "controlnet": CONTROLNET,
            "control_image": CONTROL_IMAGE,
            "scale": scale,
            "guidance_end": end,
            "guess_mode": guess,
            "image": "reference/extras/init_image.png" if kind == "inpaint" else None,
            "mask": "reference/extras/mask.png (white = repaint)" if kind == "inpaint" else None,
            "cli": cli,
        }
        print(name, "done")
    save_file(tensors, out / "references.safetensors")
    meta = {
        "prompt": prompt,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        "fixture_sha256": {f: sha256(fixture / f) for f in FIXTURE_FILES if (fixture / f).exists()},
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
