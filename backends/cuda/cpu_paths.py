"""Which path the CPU engine's products take, chosen once per process by timing the candidates on
this CPU (hardware.py says what it offers; what is fast on it is measured, not assumed):

- bf16 weights: held in oneDNN's packed layout (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT), or
  plain, with decode's few rows through the C pass `bf16_linear` or PyTorch, and a prompt's
  chunks through PyTorch's bf16 product or a float32 copy of each weight (on AVX2, PyTorch's own
  bf16 products convert through scalar code: 6x slower than float32 on a 128-row chunk).
- int8 products of many rows (int8 weights' prompt chunks, XQuant's int8 key rebuild) through
  `torch._int_mm`, or through float32 (the weights dequantized, the keys rebuilt in float32).
  `torch._int_mm` is used only where it is exact: without VNNI, oneDNN's int8 GEMM sums pairs of
  products in saturating 16-bit lanes (seen under ONEDNN_MAX_CPU_ISA=AVX2), and where PyTorch
  does not call oneDNN it runs a scalar loop, 20x slower than float32.

- q4/q8 weights (qlinear.py): decode rows and trees always through the C pass `q_linear`; a
  prompt's chunks through it too, or through the weights dequantized a slice at a time to bf16
  or float32 for PyTorch's product, whichever is fastest here (`q_prompt`).

The costs are weighed as a typical turn (TURN).
`XQCHAT_BF16_PATH` (onednn-packed, c-pass, torch), `XQCHAT_BF16_PROMPT` (onednn-packed,
"float32 copy", torch), `XQCHAT_INT_MM` (1 or 0) and `XQCHAT_Q_PROMPT` (q-pass, bf16,
float32) pin a choice, for the tests and to measure
each option with `xqchat bench`. The choice shows in `bench` JSON and
`xqchat show --hardware`.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..hardware import cpu
from . import cpu_kernels

BF16_PATHS = ("onednn-packed", "c-pass", "torch")
# A turn, as the costs weigh it: 200 decode steps of one row, 25 drafter trees of 8 rows (rows
# and trees take one path: a tree must score as the steps it stands for), 4 prompt chunks of 64.
TURN = {"row": (200, 1), "tree": (25, 8), "chunk": (4, 64)}
STICKY = 0.9  # another bf16 path replaces oneDNN's packed one only if its turn costs less than this


def onednn_packing() -> bool:
    """Whether this PyTorch/CPU can hold bf16 weights in oneDNN's blocked layout (the op is the one
    torch.compile's CPU backend uses; it refuses CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT,
    and is absent on some builds and non-x86 CPUs)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
        return True
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class CpuPaths:
    bf16: str  # one of BF16_PATHS
    bf16_prompt: str  # "onednn-packed", "float32 copy" or "torch"
    int_mm: bool  # int8 products of many rows through torch._int_mm
    ms: dict = field(default_factory=dict, compare=False)  # what was timed, per candidate
    q_prompt: str | None = None  # q4/q8 weights' prompt chunks (Q_PROMPTS), where there are some

    def describe(self, bf16: bool = True) -> dict:
        """The choices as `bench` JSON and `show --hardware` show them; the bf16 ones only where
        the weights are bf16 (`bf16`)."""
        kernels = cpu_kernels.library()
        bf16_paths = {"bf16_decode": self.bf16, "bf16_prompt": self.bf16_prompt} if bf16 else {}
        return {
            "cpu": cpu().level,
            **bf16_paths,
            "int8_many_rows": "torch._int_mm" if self.int_mm else "float32",
            **({"q_prompt": self.q_prompt} if self.q_prompt else {}),
            "int_mm_exact": int_mm_exact(),
            "c_passes": f"built ({kernels.compiled_with})" if kernels else "off",
            "measured_ms": {name: round(ms, 3) for name, ms in self.ms.items()},
        }


def _best_ms(fn, repeats: int = 3) -> float:
    fn()  # warm: first calls allocate and pack
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _bf16_costs(n: int, k: int) -> dict[str, float]:
    """ms of one decode row, one tree and one prompt chunk for each bf16 candidate on an (n, k)
    weight."""
    weight = (torch.randn(n, k) * 0.02).bfloat16()
    xs = {shape: torch.randn(rows, k) for shape, (_, rows) in TURN.items()}
    ms = {}
    if onednn_packing():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        for shape, x in xs.items():
            ms[f"onednn-packed {shape}"] = _best_ms(
                lambda x=x: torch.ops.mkldnn._linear_pointwise(
                    x.bfloat16(), packed, None, "none", [], ""
                )
            )
    if cpu_kernels.library() is not None:
        product = cpu_kernels.Bf16Product(weight, None)
        for shape in ("row", "tree"):
            ms[f"c-pass {shape}"] = _best_ms(lambda x=xs[shape]: product(x))
    for shape, x in xs.items():
        ms[f"torch {shape}"] = _best_ms(lambda x=x: F.linear(x.bfloat16(), weight))
    ms["float32 copy chunk"] = _best_ms(lambda: F.linear(xs["chunk"], weight.float()))
    return ms


def _int_mm_costs(k: int) -> dict[str, float]:
    """ms of a (256, k) x (k, k) int8 product through torch._int_mm and in float32."""
    codes = torch.randint(-127, 128, (256, k), dtype=torch.int8)
    weight = torch.randint(-127, 128, (k, k), dtype=torch.int8)
    rows, matrix = torch.randn(256, k), torch.randn(k, k)
    return {
        "int_mm": _best_ms(lambda: torch._int_mm(codes, weight.t())),
        "float32 mm": _best_ms(lambda: rows @ matrix),
    }


@functools.cache
def int_mm_exact() -> bool:
    """Whether torch._int_mm gives exact int32 products of full-range int8 codes on this CPU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=g)
    return torch.equal(torch._int_mm(a, b.t()).long(), a.long() @ b.long().t())


@functools.cache
def _measure(n: int, k: int) -> dict[str, float]:
    # on one thread: the ranking is per core, and two threads on a busy 2-core laptop wait on
    # each other at every product (seen: 20x slower), which would decide on noise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bf16_costs(n, k) | _int_mm_costs(min(k, 512))
    finally:
        torch.set_num_threads(threads)


def choose(n: int, k: int) -> CpuPaths:
    """The paths for a model whose largest layer matrix is (n, k): timed once per process on at
    most (2048, 1024) of it: 0.07 s here for an 8B shape, 0.12 s as on AVX2 (at (4096, 2048)
    an 8B model's load waited 3.6 s for it on AVX-512 and 6.6 s as on AVX2)."""
    ms = _measure(min(n, 2048), max(16, min(k - k % 16, 1024)))

    def turn(decode: str, prompt: str) -> float:
        shapes = {"row": decode, "tree": decode, "chunk": prompt}
        return sum(TURN[s][0] * ms[f"{path} {s}"] for s, path in shapes.items())

    options = [(d, p) for d in ("c-pass", "torch") for p in ("float32 copy", "torch")]
    # measured once per process; the C passes may have gone since (the tests take them away)
    ms_now = {k: v for k, v in ms.items() if cpu_kernels.library() or not k.startswith("c-pass")}
    options = [o for o in options if f"{o[0]} row" in ms_now]
    if "onednn-packed row" in ms:
        options.append(("onednn-packed", "onednn-packed"))
    for index, pin in enumerate(("XQCHAT_BF16_PATH", "XQCHAT_BF16_PROMPT")):
        pinned = os.environ.get(pin)
        if pinned:
            options = [o for o in options if o[index] == pinned] or options
    bf16, prompt = min(options, key=lambda o: turn(*o))
    # oneDNN's layout stays unless another is clearly cheaper: on AVX-512 the timings are close,
    # and a choice that flips from one load to the next on noise helps no one
    packed = ("onednn-packed", "onednn-packed")
    if packed in options and turn(bf16, prompt) > STICKY * turn(*packed):
        bf16, prompt = packed
    int_mm = os.environ.get("XQCHAT_INT_MM")
    pays = int_mm_exact() and ms["int_mm"] < ms["float32 mm"] if int_mm is None else int_mm == "1"
    return CpuPaths(bf16, prompt, pays, ms)


Q_PROMPTS = {"q-pass": None, "bf16": torch.bfloat16, "float32": torch.float32}


@functools.cache
def q_prompt(k: int) -> str:
    """How q4/q8 weights multiply a prompt's chunk of 64 rows here (one of Q_PROMPTS), timed once
    per process on one thread at a (1024, k) q4 weight."""
    pinned = os.environ.get("XQCHAT_Q_PROMPT")
    if pinned in Q_PROMPTS:
        return pinned
    if cpu_kernels.library() is None:
        return "float32"  # QLinear dequantizes with torch ops then; no choice to make
    g = torch.Generator().manual_seed(0)
    n, k = 1024, max(32, min(k - k % 32, 2048))
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.01).half()
    product = cpu_kernels.QProduct(codes, scale, -8 * scale, 4, None)
    x = torch.randn(64, k, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = {"q-pass": _best_ms(lambda: product(x))}
        for name in ("bf16", "float32"):
            dtype = Q_PROMPTS[name]
            ms[name] = _best_ms(lambda d=dtype: F.linear(x.to(d), product.values(0, n, d)))
    finally:
        torch.set_num_threads(threads)
    return min(ms, key=ms.get)
