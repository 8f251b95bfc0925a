"""The engine contract shared by both backends. No torch or mlx import here."""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from xqchat.backends.heap import release_freed_memory
from xqchat.models.errors import XQError
from xqchat.models.registry import ModelFiles
from xqchat.models.spec import ModelSpec

CacheKind = Literal["kv", "kv-quant", "xquant", "xquant-cl"]
CACHE_KINDS: tuple[str, ...] = ("kv", "kv-quant", "xquant", "xquant-cl")
WEIGHT_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8", "q4", "q8")
TREES = ("adaptive", "fixed")


@dataclass(frozen=True)
class CacheSpec:
    """What the user picks for the attention cache."""

    kind: CacheKind = "kv"
    bits: int = 4  # 2, 3, 4 or 8 (quantized kinds)
    group: int = 128  # values sharing one fp16 scale and zero point: 32, 64 or 128
    residual: int = 128  # newest tokens kept exact
    sink: int = 4  # first tokens kept exact (attention sinks)

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise XQError(f"unknown cache kind '{self.kind}' (use {', '.join(CACHE_KINDS)})")
        if self.bits not in (2, 3, 4, 8):
            raise XQError(f"--bits {self.bits}: use 2, 3, 4 or 8")
        if self.group not in (32, 64, 128):
            raise XQError(f"--group {self.group}: use 32, 64 or 128")
        if self.residual < 0:
            raise XQError(f"--residual {self.residual}: must be 0 or more")
        if not 0 <= self.sink <= 256:
            raise XQError(f"--cache-sink {self.sink}: use 0 to 256")


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"  # auto | torch | mlx
    device: str = "auto"  # auto | cpu | cuda
    weights: str = "auto"  # auto | fp32 | bf16 | fp16 | int8 | q4 | q8
    # int8 weights: input features beyond it are multiplied in float; None: chosen per model
    # (int8.CANDIDATES, cached with the conversion: `int8_auto_threshold`)
    int8_threshold: float | None = None
    int8_head: bool = True  # int8 weights: the LM head (a tied table) too
    cache: CacheSpec = field(default_factory=CacheSpec)
    mha: bool = False  # run a GQA model in its exact MHA form (K/V heads repeated)
    # speculation: None | "none" | "auto" (the model's drafter, else lookup's beam alone) |
    # "lookup" | a drafter folder
    drafter: str | None = "auto"
    # the largest tree: drafter beams, tokens per beam (the target's own next token included),
    # and a prompt-lookup beam of up to `lookup` tokens beside them (0: none)
    beam_width: int = 1
    beam_length: int = 4
    lookup: int = 7
    tree: str = "adaptive"  # adaptive: the shape up to the largest that pays most (or none); fixed

    def __post_init__(self):
        if self.beam_width < 1 or self.beam_length < 1:
            raise XQError("--beam-width and --beam-length must be 1 or more")
        if self.lookup < 0:
            raise XQError("--lookup must be 0 or more")
        if self.drafter == "lookup" and self.lookup < 1:
            raise XQError("--drafter lookup needs --lookup 1 or more")
        if self.tree not in TREES:
            raise XQError(f"--tree {self.tree}: use {' or '.join(TREES)}")


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: frozenset[int] = frozenset()


@dataclass(frozen=True)
class CacheMemory:
    tokens: int
    cache_bytes: int  # everything the cache stores for these tokens
    residual_bytes: int  # of which the exact rows: the first (sink) and newest tokens
    residual_tokens: int  # how many tokens those rows hold
    fp16_kv_bytes: int  # what an fp16 K/V cache would hold for the same tokens
    reserved_bytes: int  # allocated, including room not yet filled
    factor_bytes: int = 0  # XQuant's encode/rebuild matrices: per model, not per token
    checkpoint_bytes: int = 0  # sliding-window layers' states kept for trim (DecodingSession)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the running stats every front end reads."""

    token: int
    text: str  # filled by the chat layer, which owns the detokenizer
    prompt_tokens: int  # tokens prefilled for this reply (prefix reuse makes this small)
    cached_tokens: int  # tokens the cache already held and reused
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    cache_bytes: int
    fp16_kv_bytes: int
    accepted_per_step: float | None = None  # drafter only
    # adaptive trees: (tokens/s of the best tree, tokens/s of plain decoding) as measured so far
    speculation: tuple[float, float] | None = None
    finish_reason: str | None = None  # None while generating; stop | length | context | cancelled


class Session(Protocol):
    tokens: list[int]  # exactly what the cache holds

    def prefill(self, tokens: list[int]) -> None: ...
    def generate(
        self, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]: ...
    def logits(self, tokens: list[int]): ...  # numpy (T, V) float32, extending the cache
    def logprobs(self, tokens: list[int]) -> list[float]: ...
    def trim(self, n_keep: int) -> None: ...
    def memory(self) -> CacheMemory: ...


class Model(Protocol):
    spec: ModelSpec
    backend: str
    device: str
    dtype: str
    cache: CacheSpec  # the default for new sessions
    notes: tuple[str, ...]  # fallbacks in use that the user should be told about

    def new_session(self, cache: CacheSpec | None = None) -> Session: ...
    def weight_bytes(self) -> int: ...
    def profile_decode(self, prompt: list[int], steps: int = 32) -> dict: ...


class EngineBase:
    """What both backends' `Engine` share: a loaded module and the options it was loaded with.
    Each backend supplies `backend`, `session_class`, `weight_bytes` and `profile_decode`."""

    backend: str
    session_class: type

    drafter = None  # the backend's Drafter, bound to this model, when speculating
    beams = (1, 1)  # (width, length) of the drafter's beam search
    lookup = 0  # the most tokens prompt lookup adds to a drafter's tree (0: none)
    # chooses each step's tree (backends/speculation.py); None: always the largest
    speculation = None

    def __init__(
        self, module, device: str, dtype: str, cache: CacheSpec, notes: tuple[str, ...] = ()
    ):
        self.module, self.spec, self.device, self.dtype = module, module.spec, device, dtype
        self.cache, self.notes = cache, notes
        # which path each kind of product takes on this machine (CPU: cpu_paths.py), for
        # `bench` JSON and `xqchat show --hardware`
        self.paths: dict = {"device": device}

    def new_session(self, cache: CacheSpec | None = None):
        """A new conversation; `cache` overrides the engine's cache kind for this one."""
        return self.session_class(self, cache)

    def int8_outliers(self, tokens: list[int]) -> dict:
        """With int8 weights: for each int8 matrix (engine name) the count, per input feature, of
        the tokens in which that feature went the floating-point way (|x| > threshold), after
        running `tokens` through a new session. Each backend names its int8 layers."""
        import numpy as np

        counts = {}
        layers = self.int8_layers()
        if not layers:
            raise XQError("the model holds no int8 weights: load it with --weights int8")

        def observer(name, threshold):
            def observe(x):
                x = np.asarray(self.to_numpy(x), dtype=np.float32).reshape(-1, x.shape[-1])
                counts[name] = counts.get(name, 0) + (np.abs(x) > threshold).sum(0)

            return observe

        for name, layer in layers.items():
            layer.observe = observer(name, layer.threshold)
        try:
            self.new_session().logits(tokens)
        finally:
            for layer in layers.values():
                layer.observe = None
        return counts

    def use_drafter(
        self, folder, width: int = 4, length: int = 4, lookup: int = 0, adaptive: bool = False
    ) -> None:
        """Speculate with the drafter in `folder` (a DrafterConfig and its weights), `width` beams
        of `length` tokens per step, plus a beam of up to `lookup` tokens found by prompt lookup
        (backends/drafter.py); "lookup": that beam alone; None: decode one token per step.
        adaptive: that tree is the largest, and each step takes the shape that pays most."""
        from .drafter import LookupOnly
        from .speculation import Shape, SpeculationPolicy

        if folder is None:
            self.drafter = None
        else:
            self.drafter = LookupOnly() if folder == "lookup" else self.load_drafter(folder)
        self.beams, self.lookup = (width, length), lookup
        largest = Shape(width, length, lookup)
        self.speculation = None
        if adaptive and self.drafter is not None and not largest.plain:
            self.speculation = SpeculationPolicy(largest, drafter=folder != "lookup")


def engine_checkpoint(files: ModelFiles, opts: EngineOptions):
    """(spec, tensors) as an engine will hold them, produced lazily as (HF name, numpy array or
    qweights.Packed): a quantized file's matrices stay packed under `--weights auto|q4|q8`
    (converted to q4/q8 as asked; a float checkpoint's conversion is cached in `derived`), and
    are dequantized for the float and int8 choices; in the exact MHA form when asked."""
    from xqchat.models import qweights
    from xqchat.models.paths import derived_dir
    from xqchat.models.weights import as_mha, open_checkpoint

    checkpoint = open_checkpoint(files)
    spec = checkpoint.spec
    packed = opts.weights in ("auto", "q4", "q8")
    tensors = checkpoint.tensors(packed=packed)
    if not packed:
        tensors = qweights.dequantized(tensors)
    if opts.mha:
        tensors = ((name, as_mha(checkpoint.spec, name, array)) for name, array in tensors)
        spec = dataclasses.replace(spec, n_kv_heads=spec.n_heads)
    if opts.weights in ("q4", "q8"):
        bits = int(opts.weights[1])
        if checkpoint.quantized:  # reshaping a packed file is quick: no cache
            tensors = qweights.convert(spec, tensors, bits)
        else:
            folder = derived_dir(files) / "qweights"
            tensors, _ = qweights.cached(spec, tensors, folder, bits, opts.mha)
    return spec, tensors


def int8_auto_threshold(files: ModelFiles, opts: EngineOptions, model) -> dict:
    """`--int8-threshold auto`: the largest of int8.CANDIDATES whose perplexity on int8.SAMPLE is
    within int8.PPL_BUDGET of the float model's (bf16; fp32 on MLX's CPU), else the closest to
    it (int8.choose_threshold), measured once per model, backend and int8 variant and kept beside
    the int8 conversion."""
    import json

    from xqchat.models.paths import derived_dir
    from xqchat.models.tokenizer import load_tokenizer

    from . import int8

    variant = ("mha" if opts.mha else "model") + ("" if opts.int8_head else "-float-head")
    path = (
        derived_dir(files)
        / "int8"
        / (f"threshold-v{int8.THRESHOLD_VERSION}-{model.backend}-{variant}.json")
    )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass  # not measured yet, or damaged: measure again
    ids = load_tokenizer(files).encode(int8.SAMPLE)

    def logits(engine):
        return engine.new_session(CacheSpec()).logits(ids)

    float_weights = "bf16" if model.backend == "torch" or model.device == "metal" else "fp32"
    float_opts = dataclasses.replace(opts, weights=float_weights, drafter=None)
    float_logits = logits(load_model(files, float_opts))

    def logits_at(threshold: float):
        model.use_int8_threshold(threshold)
        return logits(model)

    result = int8.choose_threshold(ids, float_logits, logits_at)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    except OSError:
        pass  # a read-only cache dir measures again at the next load
    return result


def pick_backend(name: str) -> str:
    """auto: MLX on Apple Silicon, otherwise PyTorch (on CUDA when a GPU is visible)."""
    if name not in ("auto", "torch", "mlx"):
        raise XQError(f"unknown backend '{name}' (use auto, torch or mlx)")
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        name = "mlx" if apple and importlib.util.find_spec("mlx") else "torch"
    needs = {"mlx": ("mlx", "pip install 'xqchat[mlx]'"), "torch": ("torch", "pip install torch")}
    module, install = needs[name]
    if importlib.util.find_spec(module) is None:
        raise XQError(f"the {name} backend needs {module}, which is not installed: {install}")
    return name


def load_model(files: ModelFiles, opts: EngineOptions) -> Model:
    """Load `files` with the backend `opts` names."""
    if pick_backend(opts.backend) == "mlx":
        from xqchat.backends.mlx.model import load
        from xqchat.backends.mlx.session import ENGINE

        model = ENGINE.call(load, files, opts)
    else:
        from xqchat.backends.cuda.model import load

        model = load(files, opts)
    if model.dtype == "int8" and opts.int8_threshold is None:
        model.use_int8_threshold(int8_auto_threshold(files, opts, model)["threshold"])
    if opts.drafter not in (None, "none"):
        from .drafter import drafter_folder

        folder = "lookup" if opts.drafter == "lookup" else drafter_folder(opts.drafter, files)
        if folder != "lookup" or opts.lookup:  # (auto for a model with no drafter, no lookup)
            adaptive = opts.tree == "adaptive"
            model.use_drafter(folder, opts.beam_width, opts.beam_length, opts.lookup, adaptive)
    release_freed_memory()  # a load's transient copies (backends/heap.py)
    return model


def hardware(backend: str = "auto") -> dict:
    """What this machine offers and the paths the engine takes on it (`xqchat show --hardware`):
    the CPU's features, and for PyTorch the CPU paths chosen by measurement (cpu_paths.py) at the
    default model's shape (SmolLM2-135M: FFN 1536, dim 576; a model's own load measures its own)."""
    from .hardware import cpu

    report: dict = {"cpu": cpu().describe(), "backend": pick_backend(backend)}
    if report["backend"] == "mlx":
        import mlx.core as mx

        report["device"] = "gpu (Metal)" if mx.metal.is_available() else "cpu"
        report["mlx"] = mx.__version__
        return report
    import torch

    from .cuda import cpu_kernels, cpu_paths

    report["torch"] = torch.__version__
    report["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report["device"] = "cuda" if report["cuda"] else "cpu"  # what --device auto picks
    report["compiler"] = cpu_kernels.c_compiler()  # for the C passes (cpu_paths says if they built)
    report["cpu_paths"] = cpu_paths.choose(2 * 1536, 576).describe()
    return report
