"""The fused CPU passes of XQuant decode (cpu_kernels.c), compiled at first use by the system's
C compiler into the user's cache (one library per source, flags and machine) and called through
ctypes on the tensors' memory. Where no compiler works, `library()` is None: the cache runs the
same passes as separate torch ops (correct, slower) and the engine says so."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import platformdirs
import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC"]
THREADS = ["-fopenmp"]  # dropped where the compiler has no OpenMP (Apple's clang)
_i64, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


def _build(compiler: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, platform.node()]).encode())
    target = Path(platformdirs.user_cache_dir("xqchat")) / "kernels" / f"{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [compiler, *flags, "-o", str(partial), str(SOURCE), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        partial.replace(target)  # atomic: another process never loads a half-written library
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("XQCHAT_NO_CPU_KERNELS"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    for flags in (FLAGS + THREADS, FLAGS):
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags)))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    else:
        return None
    lib.dequantize.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _int, _i64, _int, _int, _ptr]
    lib.rope_scores.argtypes = [_ptr, _int, _ptr, _ptr, _f32, _ptr, _ptr, _ptr]
    lib.rope_scores.argtypes += [_i64, _i64, _i64, _i64, _f32, _ptr]
    return lib


def _address(t: torch.Tensor | None):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu", "the C kernels read contiguous CPU rows"
    return t.data_ptr()


def dequantize(q, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """quant.dequantize's values (float32) for the packed blocks `q`, written into `out` or added
    to it."""
    n = q.shape[0] * q.shape[1]
    blocks = out.numel() // n
    columns = q.scale.shape[-1] > 1  # quantize_columns: a scale per column, not per group
    scale, zero = (t.float().contiguous() for t in (q.scale, q.zero))
    assert out.dtype == torch.float32 and q.codes.numel() == blocks * n * q.bits // 8
    library().dequantize(
        _address(q.codes), _address(scale), _address(zero), blocks, n, q.bits, q.shape[1],
        int(columns), int(accumulate), _address(out),
    )  # fmt: skip
    return out


def rope_scores(keys, q, cos, sin, bias, norm, eps: float) -> torch.Tensor:
    """Scores (H_kv, m, T) of q (H_kv, m, D) against keys (T, H_kv * D) rebuilt as rows @ W_k
    (bf16 or float32), after the bias, the k-norm (weight (D,)) and RoPE (tables (T, D))."""
    n_kv, m, d = q.shape
    t = keys.shape[0]
    scores = torch.empty(n_kv, m, t, dtype=torch.float32)
    f32 = [None if x is None else x.float().contiguous() for x in (bias, norm, cos, sin, q)]
    library().rope_scores(
        _address(keys), int(keys.dtype == torch.bfloat16), *map(_address, f32[:2]), eps,
        *map(_address, f32[2:]), t, n_kv, m, d, d**-0.5, _address(scores),
    )  # fmt: skip
    return scores
