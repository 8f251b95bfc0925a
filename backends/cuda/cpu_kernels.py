"""The fused CPU passes of XQuant decode, of LLM.int8()'s product and of decode attention on an
exact bf16 cache (cpu_kernels.c), and of q4/q8 weights (cpu_qlinear.c), compiled together at
first use by the system's C compiler into the user's cache (one library per source, flags and
CPU) and called through ctypes on the tensors' memory. Where no compiler works, `library()` is
None: the caches, Int8Linear and QLinear run the same steps as torch ops (correct, slower) and
the engine says so."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import platformdirs
import torch

from ..hardware import cpu

# the passes (.c), built together into one library, and what they share (.h)
SOURCES = [
    Path(__file__).with_name(name) for name in ("cpu_kernels.c", "cpu_qlinear.c", "cpu_step.c")
]
HEADER = Path(__file__).with_name("cpu_simd.h")
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC"]
_i64, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_lock = threading.Lock()
# int8_linear's most rows (cpu_kernels.c's INT8_ROWS): decode and a drafter's tree, where reading
# each weight row once for all rows wins; longer prefill chunks go to oneDNN's blocked int8 GEMM.
INT8_ROWS = 16
# bf16_linear's most rows (cpu_kernels.c's LINEAR_ROWS): decode and a drafter's tree.
LINEAR_ROWS = 16
# attend_bf16's most new rows per head: decode and a drafter's tree (longer prefill chunks go to
# PyTorch's attention, a matrix product on a float32 copy).
ATTEND_ROWS = 16


def _cpu() -> str:
    """What -march=native compiles for: a library built on another CPU may not run here."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join([line for line in lines if line.startswith(("model name", "flags"))][:2])
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(compiler: list[str], flags: list[str]) -> Path:
    identity = " ".join([*compiler, *flags, _cpu()]).encode()
    source = b"".join(path.read_bytes() for path in [*SOURCES, HEADER])
    key = hashlib.sha256(source + identity).hexdigest()[:16]
    target = Path(platformdirs.user_cache_dir("xqchat")) / "kernels" / f"{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        try:
            subprocess.run(
                [*compiler, *flags, "-o", partial, *map(str, SOURCES), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, target)  # atomic: no process loads a half-written library
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


def c_compiler() -> str | None:
    """The C compiler the passes are built with: $CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("XQCHAT_NO_CPU_KERNELS"):
        return None
    compiler = c_compiler()
    if compiler is None:
        return None
    # Tried in order: this CPU's instructions (hardware.py: capped where ATEN_CPU_CAPABILITY caps
    # PyTorch) and OpenMP threads, then without OpenMP (Apple's clang has none), then without
    # -march (compilers that refuse it).
    march = cpu().compile_flags()
    with _lock:
        for variant in ([*march, "-fopenmp"], march, []):
            try:
                lib = ctypes.CDLL(str(_build(shlex.split(compiler), FLAGS + variant)))
                break
            except (OSError, subprocess.SubprocessError):
                continue
        else:
            return None
    lib.dequantize.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _int, _i64, _int, _int, _ptr, _int]
    lib.rope_scores.argtypes = [_ptr, _int, _ptr, _ptr, _ptr, _ptr, _f32, _ptr, _ptr, _ptr]
    lib.rope_scores.argtypes += [_i64, _i64, _i64, _i64, _f32, _ptr, _int]
    lib.int8_linear.argtypes = [_ptr, _i64, _i64, _f32, _ptr, _ptr, _ptr, _i64, _ptr, _int]
    lib.attend_bf16.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32]
    lib.attend_bf16.argtypes += [_ptr, _int]
    lib.bf16_linear.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int]
    lib.quantize_rows.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _int]
    lib.rope_attend.argtypes = [_ptr, _int, _ptr, _ptr, _ptr, _ptr, _f32, _ptr, _ptr, _ptr, _ptr]
    lib.rope_attend.argtypes += [_i64, _i64, _i64, _i64, _i64, _ptr, _f32, _ptr, _ptr, _int]
    lib.q_linear.argtypes = [_ptr, _i64, _i64, _int, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _int]
    lib.q_dequantize.argtypes = [_ptr, _int, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _ptr, _int]
    lib.rms_norm.argtypes = [_ptr, _i64, _i64, _ptr, _f32, _ptr]
    lib.rope_append_bf16.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr]
    lib.rope_append_bf16.argtypes += [_ptr, _ptr, _ptr, _ptr, _i64, _i64]
    lib.compiled_with = " ".join(variant)  # shown by `xqchat show --hardware`
    return lib


def _run(name: str, function, *args):
    """function(*args), within a profiler range when the profiler runs, so `bench speed --profile`
    counts the pass among the matmuls (ctypes calls are otherwise invisible to it); without the
    cost of a context manager otherwise: the q4/q8 pass runs ~150 times per decode step."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            return function(*args)
    return function(*args)


def _address(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(condition: bool, what: str) -> None:
    if not condition:  # not an assert: the C side would read or write out of bounds
        raise ValueError(f"cpu_kernels: {what}")


def dequantize(q, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """quant.dequantize's values (float32) for the packed blocks `q` (fp16 scales and zero
    points, read as they are), written into `out` or added to it."""
    n = q.shape[0] * q.shape[1]
    blocks = out.numel() // n
    # quantize_columns: one scale per column (..., 1, columns); quantize: one per group (..., groups, 1)
    columns = q.scale.shape[-2] == 1 and q.scale.shape[-1] == q.shape[1]
    n_scales = q.shape[1] if columns else q.shape[0]
    codes, scale, zero = (t.contiguous() for t in (q.codes, q.scale, q.zero))
    _check(
        out.dtype == torch.float32 and out.is_contiguous() and not out.is_cuda
        and scale.dtype == zero.dtype == torch.float16
        and out.numel() == blocks * n and codes.numel() == blocks * n * q.bits // 8
        and scale.numel() == zero.numel() == blocks * n_scales,
        "the codes, scales and output of dequantize do not match",
    )  # fmt: skip
    library().dequantize(
        _address(codes), _address(scale), _address(zero), blocks, n, q.bits, q.shape[1],
        int(columns), int(accumulate), _address(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


class IntKeys(NamedTuple):
    """Rebuilt keys as int8 products: int32 (T, kv_dim), whose scales the C passes apply as they
    read each row (int8.int8_product's epilogue: products * column_scale * row_scale)."""

    products: torch.Tensor
    row_scale: torch.Tensor  # (T, 1)
    column_scale: torch.Tensor  # (kv_dim,)


KEYS_FLOAT32, KEYS_BF16, KEYS_INT32 = range(3)  # cpu_kernels.c's key_rows kinds


def _key_operands(keys, q, cos, sin, bias, norm, what: str):
    """rope_scores' and rope_attend's keys (T, H_kv * D: float32, bf16 or IntKeys, as the C side
    takes them: address, kind, row and column scales), tables (T, D), bias, k-norm weight and
    queries (H_kv, m, D), contiguous and float32, checked against each other."""
    n_kv, _, d = q.shape
    if isinstance(keys, IntKeys):
        rows, row_scale, column_scale = (x.contiguous() for x in keys)
        kind, t = KEYS_INT32, rows.shape[0]
        _check(
            rows.dtype == torch.int32 and row_scale.shape == (t, 1)
            and column_scale.shape == (n_kv * d,)
            and row_scale.dtype == column_scale.dtype == torch.float32,
            f"the int8 products and scales of {what}'s keys do not match",
        )  # fmt: skip
    else:
        row_scale = column_scale = None
        rows = (
            keys if keys.dtype in (torch.float32, torch.bfloat16) else keys.float()
        ).contiguous()
        kind = KEYS_BF16 if rows.dtype == torch.bfloat16 else KEYS_FLOAT32
    bias, norm, cos, sin, q = (
        None if x is None else x.float().contiguous() for x in (bias, norm, cos, sin, q)
    )
    t = rows.shape[0]
    _check(
        rows.shape == (t, n_kv * d) and cos.shape == sin.shape == (t, d)
        and (bias is None or bias.shape == (n_kv * d,)) and (norm is None or norm.shape == (d,)),
        f"the keys, tables and queries of {what} do not match",
    )  # fmt: skip
    held = (rows, row_scale, column_scale)  # the caller keeps these alive through the call
    key_args = (_address(rows), kind, _address(row_scale), _address(column_scale))
    return held, key_args, bias, norm, cos, sin, q


def rope_scores(keys, q, cos, sin, bias, norm, eps: float) -> torch.Tensor:
    """Scores (H_kv, m, T) of q (H_kv, m, D) against keys (T, H_kv * D) rebuilt as rows @ W_k
    (read as they are when bf16, float32 or IntKeys), after the bias, the k-norm (weight (D,))
    and RoPE (tables (T, D))."""
    n_kv, m, d = q.shape
    held, key_args, bias, norm, cos, sin, q = _key_operands(
        keys, q, cos, sin, bias, norm, "rope_scores"
    )
    scores = torch.empty(n_kv, m, held[0].shape[0], dtype=torch.float32)
    library().rope_scores(
        *key_args, _address(bias), _address(norm), eps, _address(cos), _address(sin),
        _address(q), held[0].shape[0], n_kv, m, d, d**-0.5, _address(scores),
        torch.get_num_threads(),
    )  # fmt: skip
    return scores


def rope_attend(keys, q, cos, sin, bias, norm, eps: float, values, value_heads):
    """One token's attention over rebuilt keys, as rope_scores scores them, and cached rows
    `values` (T, W) that every head shares, in one pass: (out (H_kv, m, D), the softmax-weighted
    sums of the rows projected by their head's value_heads (H_kv, W, D), and lse (H_kv, m), the
    log-sum-exp of the scores), float32."""
    n_kv, m, d = q.shape
    held, key_args, bias, norm, cos, sin, q = _key_operands(
        keys, q, cos, sin, bias, norm, "rope_attend"
    )
    t = held[0].shape[0]
    values, value_heads = values.float().contiguous(), value_heads.float().contiguous()
    w = values.shape[1]
    _check(
        values.dim() == 2 and values.shape[0] == t and value_heads.shape == (n_kv, w, d),
        "rope_attend's values and value projection do not match",
    )  # fmt: skip
    out = torch.empty(n_kv, m, d, dtype=torch.float32)
    lse = torch.empty(n_kv, m, dtype=torch.float32)
    library().rope_attend(
        *key_args, _address(bias), _address(norm), eps, _address(cos), _address(sin),
        _address(q), _address(values), t, n_kv, m, d, w, _address(value_heads), d**-0.5,
        _address(out), _address(lse), torch.get_num_threads(),
    )  # fmt: skip
    return out, lse


def attend_bf16(q, keys, values, n: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the newest m rows on the first n rows of an exact bf16 cache: q (1, H, m, D)
    float32 (m <= ATTEND_ROWS), keys and values (1, H_kv, capacity, D) bf16, the last m of the n
    rows the new rows' own -> (1, H, m, D) float32. Every new row sees the n - m rows before
    them; mask (m, m) bool says which of the newest m each sees (None: all)."""
    _, n_heads, m, d = q.shape
    _, n_kv, capacity, _ = keys.shape
    q = q.contiguous()
    mask = None if mask is None else mask.to(torch.uint8).contiguous()
    _check(
        q.dtype == torch.float32 and 1 <= m <= ATTEND_ROWS and n_heads % n_kv == 0
        and keys.dtype == values.dtype == torch.bfloat16 and keys.shape == values.shape
        and keys.shape[3] == d and keys.is_contiguous() and values.is_contiguous()
        and m <= n <= capacity and not keys.is_cuda and (mask is None or mask.shape == (m, m)),
        "the query, cache and mask of attend_bf16 do not match",
    )  # fmt: skip
    out = torch.empty_like(q)
    library().attend_bf16(
        q.data_ptr(), m, _address(mask), keys.data_ptr(), values.data_ptr(), n, capacity,
        n_heads, n_kv, d, d**-0.5, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8.quantize_rows(x, row_absmax(x)) in one pass: x (M, K) float32 -> int8 codes (M, K)
    and float32 row scales (M, 1)."""
    x = x.contiguous()
    _check(x.dim() == 2 and x.dtype == torch.float32 and not x.is_cuda, "quantize_rows' input")
    codes = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0], 1)
    library().quantize_rows(
        x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), scale.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return codes, scale


class Int8Product:
    """cpu_kernels.c's int8_linear bound to one layer's weights: LLM.int8()'s x (m, k) @ weightᵀ
    (int8 (n, k), float32 scale (n,)) + bias, all float32 but the codes, quantizing x,
    splitting out its outlier columns and multiplying in one pass. The weights are checked once and
    their addresses kept: decode calls this 151 times per token."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        n, k = weight.shape
        bias = None if bias is None else bias.detach().float().contiguous()
        _check(
            weight.dtype == torch.int8 and weight.is_contiguous() and not weight.is_cuda
            and scale.dtype == torch.float32 and scale.shape == (n,) and scale.is_contiguous()
            and (bias is None or bias.shape == (n,)),
            "the weights and scales of int8_linear do not match",
        )  # fmt: skip
        self.weight, self.held = weight, (scale, bias)  # held: the addresses below stay valid
        self.n, self.k = n, k
        self.weights = (_address(weight), _address(scale), _address(bias), n)

    def __call__(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        m = len(x)
        x = x.contiguous()
        _check(
            m <= INT8_ROWS and x.shape[1] == self.k and x.dtype == torch.float32 and not x.is_cuda,
            "the input of int8_linear does not match its weights",
        )  # fmt: skip
        y = torch.empty(m, self.n)
        args = (x.data_ptr(), m, self.k, threshold, *self.weights, y.data_ptr())
        _run("xqchat::int8_linear", library().int8_linear, *args, torch.get_num_threads())
        return y


class Bf16Product:
    """cpu_kernels.c's bf16_linear bound to one Linear's bf16 weight (n, k): x (m, k) float32 ->
    x @ weightᵀ + bias (m, n) float32, for m <= LINEAR_ROWS, at the speed of reading the weight,
    where oneDNN cannot pack bf16 (CPUs without AVX-512 BW/VL/DQ)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        n, k = weight.shape
        bias = None if bias is None else bias.detach().float().contiguous()
        _check(
            weight.dtype == torch.bfloat16 and weight.is_contiguous() and not weight.is_cuda
            and k % 16 == 0 and (bias is None or bias.shape == (n,)),
            "the weight of bf16_linear is not a contiguous bf16 (n, k) with k a multiple of 16",
        )  # fmt: skip
        self.held, self.n, self.k = (weight, bias), n, k
        self.weights = (_address(weight), _address(bias), n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = len(x)
        x = x.float().contiguous()
        _check(
            m <= LINEAR_ROWS and x.shape[1] == self.k and not x.is_cuda,
            "the input of bf16_linear does not match its weight",
        )  # fmt: skip
        y = torch.empty(m, self.n)
        weight, bias, n = self.weights
        args = (x.data_ptr(), m, self.k, weight, bias, n, y.data_ptr(), torch.get_num_threads())
        _run("xqchat::bf16_linear", library().bf16_linear, *args)
        return y


class QProduct:
    """cpu_qlinear.c's q_linear bound to one layer's q4 or q8 weight (models/qweights.py): codes
    (n, k / 2) uint8 or (n, k) int8, fp16 scales (and q4 mins) (n, k / group): x (m, k) float32
    -> x @ Wᵀ + bias (m, n) float32, for any m."""

    def __init__(self, codes, scale, min_, bits: int, bias):
        n, k = codes.shape[0], codes.shape[1] * (2 if bits == 4 else 1)
        bias = None if bias is None else bias.detach().float().contiguous()
        groups = scale.shape[1] if scale.dim() == 2 else 0
        _check(
            codes.dtype == (torch.uint8 if bits == 4 else torch.int8) and codes.is_contiguous()
            and not codes.is_cuda and groups and k % groups == 0 and (k // groups) % 32 == 0
            and scale.shape == (n, groups) and scale.dtype == torch.float16
            and scale.is_contiguous() and (min_ is None) == (bits == 8)
            and (min_ is None or (min_.shape == scale.shape and min_.dtype == torch.float16
                                  and min_.is_contiguous()))
            and (bias is None or bias.shape == (n,)),
            "the codes, scales and mins of q_linear do not match",
        )  # fmt: skip
        self.held, self.n, self.k = (codes, scale, min_, bias), n, k
        self.weights = (bits, _address(codes), _address(scale), _address(min_), k // groups)
        self.bias = _address(bias)

    def values(self, first: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows [first, first + rows) dequantized, (rows, k) float32 or bf16."""
        _check(0 <= first and first + rows <= self.n, "q_dequantize's rows are out of range")
        out = torch.empty(rows, self.k, dtype=dtype)
        bits, codes, scale, min_, group = self.weights
        library().q_dequantize(
            codes, bits, scale, min_, group, self.k, first, rows, int(dtype == torch.bfloat16),
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = len(x)
        x = x.contiguous()
        _check(
            x.dim() == 2 and x.shape[1] == self.k and x.dtype == torch.float32 and not x.is_cuda,
            "the input of q_linear does not match its weight",
        )  # fmt: skip
        y = torch.empty(m, self.n)
        args = (x.data_ptr(), m, self.k, *self.weights, self.bias, self.n, y.data_ptr())
        _run("xqchat::q_linear", library().q_linear, *args, torch.get_num_threads())
        return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension of x's few rows (float32), in one call."""
    k = x.shape[-1]
    x = x.contiguous()
    _check(
        x.dtype == weight.dtype == torch.float32 and weight.shape == (k,) and not x.is_cuda
        and weight.is_contiguous(),
        "the input and weight of rms_norm do not match",
    )  # fmt: skip
    y = torch.empty_like(x)
    library().rms_norm(x.data_ptr(), x.numel() // k, k, weight.data_ptr(), eps, y.data_ptr())
    return y


def rope_append_bf16(q, k, v, cos, sin, keys, values, offset: int) -> torch.Tensor:
    """cache.py's rotate of the newest m rows' queries and keys, and the keys and values written
    into an exact bf16 cache at `offset`, in one call: q (1, m, H, D), k and v (1, m, H_kv, D)
    float32 with rows of any stride, cos and sin (m, D), keys and values (1, H_kv, capacity, D)
    -> the rotated queries (1, H, m, D), as attend_bf16 takes them."""
    _, m, n_heads, d = q.shape
    _, n_kv, capacity, _ = keys.shape
    q, cos, sin = q.contiguous(), cos.contiguous(), sin.contiguous()
    _check(
        q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype == torch.float32
        and k.shape == v.shape == (1, m, n_kv, d) and cos.shape == sin.shape == (m, d)
        and k.stride()[2:] == v.stride()[2:] == (d, 1)
        and keys.dtype == values.dtype == torch.bfloat16 and keys.shape == values.shape
        and keys.shape[3] == d and keys.is_contiguous() and values.is_contiguous()
        and 0 <= offset and offset + m <= capacity and not keys.is_cuda,
        "the queries, keys, values and cache of rope_append_bf16 do not match",
    )  # fmt: skip
    out = torch.empty(1, n_heads, m, d)
    library().rope_append_bf16(
        q.data_ptr(), m, n_heads, k.data_ptr(), k.stride(1), v.data_ptr(), v.stride(1), n_kv, d,
        cos.data_ptr(), sin.data_ptr(), out.data_ptr(), keys.data_ptr(), values.data_ptr(),
        offset, capacity,
    )  # fmt: skip
    return out
