#!/usr/bin/env python3
"""Scheduler-only references for sampler options the fixture's tables do not cover.

`reference/schedulers_extra` runs each sampler with its default options. This steps
diffusers' schedulers with other options a model folder's `scheduler_config.json` can
carry (UniPC order 3 and v-prediction with Karras σ, DPM++ 2M SDE with the Heun update,
Heun with Karras σ and v-prediction, LCM with v-prediction, TCD with sample prediction),
from the fixture's scheduler config, 8 steps, on random model outputs, with
`torch.Generator("cpu").manual_seed(1234)` for the samplers that draw noise (TCD with
`eta=0.3`). No model is involved.

Output (default tests/references/sampler_options/): `trajectories.safetensors` (`sample`,
`eps0..14`, and each CASE's final sample) and `cases.json` (each case's class, options,
timestep count, and the SHA-256 of the scheduler config it started from).

  HYPERGEN_FIXTURE_DIR=../shared/fixtures/tiny-sdxl python scripts/references/sampler_options.py
(diffusers 0.42.1, torch 2.15; see sampler_edits.py for the environment)
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusers import (
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

# name: (class, options, hypergen's --scheduler)
CASES = {
    "unipc.order3": (UniPCMultistepScheduler, {"solver_order": 3}, "unipc"),
    "unipc.vpred.karras": (
        UniPCMultistepScheduler,
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        "unipc",
    ),
    "dpmpp_2m_sde.heun": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        "dpmpp_2m_sde",
    ),
    "heun.karras.vpred": (
        HeunDiscreteScheduler,
        {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
        "heun",
    ),
    "lcm.vpred": (LCMScheduler, {"prediction_type": "v_prediction"}, "lcm"),
    "tcd.sample": (TCDScheduler, {"prediction_type": "sample"}, "tcd"),
}
STEPS = 8


def main() -> None:
    root = Path(__file__).resolve().parent.parent.parent
    fixture = Path(os.environ.get("HYPERGEN_FIXTURE_DIR", root.parent / "shared/fixtures/tiny-sdxl"))
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "tests/references/sampler_options"
    out.mkdir(parents=True, exist_ok=True)
    config_path = fixture / "scheduler/scheduler_config.json"
    base = json.loads(config_path.read_text())
    g = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    eps = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2 * STEPS - 1)]
    tensors = {"sample": sample, **{f"eps{i}": e for i, e in enumerate(eps)}}
    cases = {}
    for name, (cls, options, kind) in CASES.items():
        scheduler = cls.from_config({**base, **options})
        scheduler.set_timesteps(STEPS)
        x = sample * scheduler.init_noise_sigma
        generator = torch.Generator("cpu").manual_seed(1234)
        for i, t in enumerate(scheduler.timesteps):
            kwargs = {}
            if cls in (DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler):
                kwargs["generator"] = generator
            if cls is TCDScheduler:
                kwargs["eta"] = 0.3
            x = scheduler.step(eps[i], t, x, **kwargs).prev_sample
        tensors[name] = x.contiguous()
        cases[name] = {
            "class": cls.__name__,
            "options": options,
            "scheduler": kind,
            "eta": 0.3 if cls is TCDScheduler else None,
            "steps": STEPS,
            "timesteps": len(scheduler.timesteps),
        }
    save_file(tensors, out / "trajectories.safetensors")
    meta = {
        "scheduler_config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(),
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
