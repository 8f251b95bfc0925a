"""Time the q4/q8 C pass `q_linear` for 1 to 16 rows of x (a decode step to a drafter's tree) on
the default model's layer shapes, to see what a tree's extra rows cost:

    .venv/bin/python packaging/bench_qlinear.py          # SmolLM2-135M's shapes
    .venv/bin/python packaging/bench_qlinear.py --1b     # Llama-3.2-1B's FFN shapes

Random codes and scales (speed does not depend on the values); best of 5 runs of 50 calls,
with the threads PyTorch uses. Run it on an idle machine."""

import sys
import time

import torch

from xqchat.backends.cuda import cpu_kernels

SHAPES = {  # (outputs, inputs) of one layer's products
    "135m": [(1536, 576), (576, 1536), (576, 576), (192, 576)],
    "1b": [(8192, 2048), (2048, 8192)],
}


def product(n: int, k: int, bits: int, group: int = 32) -> cpu_kernels.QProduct:
    if bits == 4:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    else:
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group) * 0.01).half()
    min_ = (torch.randn(n, k // group) * 0.01).half() if bits == 4 else None
    return cpu_kernels.QProduct(codes, scale, min_, bits, None)


def seconds(p: cpu_kernels.QProduct, x: torch.Tensor) -> float:
    for _ in range(20):
        p(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            p(x)
        best = min(best, (time.perf_counter() - start) / 50)
    return best


def main() -> None:
    torch.manual_seed(0)
    shapes = SHAPES["1b" if "--1b" in sys.argv else "135m"]
    for bits in (4, 8):
        for m in (1, 2, 4, 8, 16):
            total = sum(seconds(product(n, k, bits), torch.randn(m, k)) for n, k in shapes)
            print(f"q{bits}, {m:2d} rows: {total * 1e6:8.1f} us, {total * 1e6 / m:7.1f} us per row")


if __name__ == "__main__":
    main()
