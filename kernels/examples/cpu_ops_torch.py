#!/usr/bin/env python3
"""PyTorch's CPU timings of the ops `cpu_ops.rs` times, at the same shapes.

    python3 kernels/examples/cpu_ops_torch.py [--iters N] [--threads T]

Float32, `torch.set_num_threads(T)` (default 2), inference mode; each op runs once to warm
up, then N times (default 5). Prints the median wall time, the median process CPU time
per thread (`cpu/thr`: the better estimate of an idle machine's time when other work
shares the cores) and the rate from the wall time, as `cpu_ops.rs` does. Ops are written
as diffusers writes them: heads are strided views of `[N, L, H*D]` projections,
`F.scaled_dot_product_attention`, GEGLU as `a * F.gelu(gate)` on the two halves,
GroupNorm as `F.group_norm` then `F.silu`.
"""

import argparse
import time

import torch
import torch.nn.functional as F


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def timed(iters, threads, op):
    op()
    walls, cpus = [], []
    for _ in range(iters):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = op()
        walls.append((time.perf_counter() - wall0) * 1e3)
        cpus.append((time.process_time() - cpu0) * 1e3 / threads)
        del out  # freeing the output is not the op's time (as in cpu_ops.rs)
    return median(walls), median(cpus)


def data(shape, seed, shift=0.0):
    # The same deterministic data as cpu_ops.rs (values do not change the timings).
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, dtype=torch.float64) * 0.618034 + seed
    x = shift + 2.0 * (torch.sin(i * 12.9898) * 0.7 + torch.cos(i * 78.233) * 0.3)
    return x.to(torch.float32).reshape(shape)


LINEAR_SHAPES = [
    (512, 1280, 10240), (512, 5120, 1280), (512, 1280, 1280), (2048, 640, 5120),
    (2048, 2560, 640), (2048, 640, 640), (154, 2048, 1280),
    (512, 64, 64), (512, 64, 512), (512, 256, 64), (128, 128, 128), (128, 128, 1024),
    (128, 512, 128), (154, 96, 64), (154, 96, 128),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} cpu_ops: {torch.get_num_threads()} threads, "
        f"median of {args.iters}"
    )
    rows = []
    with torch.inference_mode():
        for what, n, h, l, s, d in [
            ("self", 2, 10, 1024, 1024, 64),
            ("self", 2, 5, 4096, 4096, 64),
            ("cross", 2, 10, 1024, 77, 64),
            ("vae", 1, 1, 4096, 4096, 512),
        ]:

            def split(t):
                return t.view(n, -1, h, d).transpose(1, 2)

            q = split(data([n, l, h * d], 0.1))
            k = split(data([n, s, h * d], 0.2))
            v = split(data([n, s, h * d], 0.3))
            wall, cpu = timed(
                args.iters, args.threads, lambda: F.scaled_dot_product_attention(q, k, v)
            )
            gflop = 4.0 * n * h * l * s * d / 1e9
            rows.append(
                (f"attention {what} [{n},{h},{l},{d}] S={s}", wall, cpu, gflop / (wall / 1e3), "GFLOP/s")
            )

        for n, l, w in [(2, 4096, 2560), (2, 1024, 5120)]:
            x = data([n, l, w], 0.4)

            def geglu():
                value, gate = x.chunk(2, dim=-1)
                return value * F.gelu(gate)

            wall, cpu = timed(args.iters, args.threads, geglu)
            gb = (n * l * w + n * l * w // 2) * 4 / 1e9
            rows.append((f"geglu [{n},{l},{w}]", wall, cpu, gb / (wall / 1e3), "GB/s"))

        # The linear rows of cpu_ops.rs: full-size projections, then the tiny fixture's
        # at 256² (widths 64 and 128, cross-attention on 96-wide text).
        for rows_, k, n in LINEAR_SHAPES:
            x = data([rows_, k], 0.8)
            w = data([n, k], 0.9) * 0.05
            b = data([n], 1.0)
            wall, cpu = timed(args.iters, args.threads, lambda: F.linear(x, w, b))
            gflop = 2.0 * rows_ * k * n / 1e9
            rows.append((f"linear [{rows_},{k}]x[{k},{n}]", wall, cpu, gflop / (wall / 1e3), "GFLOP/s"))

        for n, c, l in [(2, 320, 4096), (1, 512, 65536)]:
            x = data([n, c, l], 0.5, 0.3)
            gamma = data([c], 0.6, 1.0)
            beta = data([c], 0.7)
            wall, cpu = timed(
                args.iters,
                args.threads,
                lambda: F.silu(F.group_norm(x, 32, gamma, beta, 1e-5)),
            )
            gb = 2 * n * c * l * 4 / 1e9
            rows.append(
                (f"group_norm+silu [{n},{c},{l}] g32", wall, cpu, gb / (wall / 1e3), "GB/s")
            )

    print(f"{'op':<46} {'torch ms':>9} {'cpu/thr':>9} {'torch rate':>14}")
    for op, wall, cpu, rate, unit in rows:
        print(f"{op:<46} {wall:>9.2f} {cpu:>9.2f} {rate:>9.1f} {unit}")


if __name__ == "__main__":
    main()
