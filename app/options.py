"""The command line's values, checked before any model is loaded.

A bad value costs the user one line at once, not a model load (seconds to minutes) followed by
an "internal error". Exit codes follow one rule:

2  the command line is wrong: a value out of range or not a number, options that contradict,
   a value that does not fit the model named (a window longer than its context), a file or
   folder that does not exist or is not of the kind asked for (click's own usage errors);
1  the command is right but cannot run here or failed: no CUDA GPU, mlx not installed, a model
   or drafter not installed, a file whose contents are unusable (XQError).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xqchat.backends import int8
from xqchat.backends.base import CACHE_KINDS, TREES, WEIGHT_DTYPES, CacheSpec, EngineOptions
from xqchat.models.errors import XQError

if TYPE_CHECKING:
    from xqchat.models.registry import ModelFiles
    from xqchat.models.spec import ModelSpec

# Below this, sampling picks the most likely token as greedy decoding does, and far below it
# logits / temperature overflows float32 (1e-300 gave NaN probabilities and a crash).
MIN_TEMPERATURE = 1e-3
SEED_MAX = 2**64 - 1  # torch's and MLX's generators take 64-bit seeds; numpy's any >= 0
# The drafter's tree (beam width x beam length nodes, plus lookup's) is verified in one forward
# pass and cut to what the cache has room for; larger values only cost time, and values past
# int64 crashed inside torch.
MAX_BEAM_WIDTH = 64
MAX_BEAM_LENGTH = 64
MAX_LOOKUP = 256


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and ±inf. Its range check compares, and every
    comparison with nan is false, so `--temperature nan` used to pass it."""

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class MemorySize(click.ParamType):
    """A size of memory: 16GB, 16GiB, 512MB, 16G (GB and GiB alike mean 2^30 bytes: laptops'
    memory is sold in binary units under decimal names) -> bytes."""

    name = "size"

    def __init__(self, zero: bool = False) -> None:
        self.zero = zero  # whether 0 means something (no memory for it)

    UNITS = {"": 2**30, "G": 2**30, "GB": 2**30, "GIB": 2**30, "M": 2**20, "MB": 2**20}
    UNITS |= {"MIB": 2**20, "T": 2**40, "TB": 2**40, "TIB": 2**40}

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().replace(" ", "")
        number = text.rstrip("GMTIB")
        unit = text[len(number) :]
        try:
            size = float(number) * self.UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size such as 16GB or 512MB", param, ctx)
        if not math.isfinite(size) or size < 0 or size == 0 and not self.zero:
            self.fail(f"{value!r} is not a size such as 16GB or 512MB", param, ctx)
        return int(size)


class Int8Threshold(click.ParamType):
    """`--int8-threshold`: auto (None) or a finite number of 0 or more."""

    name = "auto|FLOAT"

    def convert(self, value, param, ctx) -> float | None:
        if value is None or isinstance(value, float):
            return value
        try:
            return int8.parse_threshold(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Temperature(FiniteFloat):
    """0 (greedy) or a finite temperature of at least MIN_TEMPERATURE."""

    def __init__(self, max: float | None = None) -> None:
        super().__init__(min=0, max=max)

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = super().convert(value, param, ctx)
        if 0 < number < MIN_TEMPERATURE:
            self.fail(
                f"{value} is too small: use 0 (greedy) or at least {MIN_TEMPERATURE:g}.",
                param,
                ctx,
            )
        return number


class ModelName(click.ParamType):
    """What --model takes. An empty name used to mean the default model without a word."""

    name = "model"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        text = str(value)
        if not text.strip():
            self.fail("the model name is empty (use default, a pulled model, a path)", param, ctx)
        return text


DRAFTER_KEYWORDS = ("none", "auto", "lookup")


class Drafter(click.ParamType):
    """none, auto, lookup, or a folder holding a drafter's config and weights. The folder's
    contents are read later (check_drafter), with the model they must fit."""

    name = "drafter"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        from xqchat.backends.drafter import CONFIG, WEIGHTS

        text = str(value)
        if text in DRAFTER_KEYWORDS:
            return text
        folder = Path(text).expanduser()
        if not folder.is_dir():
            self.fail(
                f"{text}: no such folder (use none, auto, lookup or a drafter folder)", param, ctx
            )
        missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
        if missing:
            self.fail(
                f"{text} is not a drafter folder: it has no {' and no '.join(missing)} "
                "(`xqchat train-drafter` writes both)",
                param,
                ctx,
            )
        return text


class OutputFolder(click.Path):
    """A folder that exists or could be made under the nearest folder that does (the command
    makes it before its long work: os.access cannot say what root may write)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Path:
        folder = super().convert(value, param, ctx)
        existing = Path(folder).expanduser().absolute()
        try:
            while not existing.exists():
                existing = existing.parent
        except OSError as e:  # exists() raises for a name longer than the system allows
            self.fail(f"{folder}: {e.strerror}.", param, ctx)
        if not existing.is_dir():
            self.fail(f"{existing} is a file, so {folder} cannot be made.", param, ctx)
        return folder


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user typed option `name` (rather than leaving its default)."""
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


class Preflight:
    """The checks that need the model's files or this machine, done before the model loads.
    The spec is read only when a check needs it (a GGUF's header takes a few seconds)."""

    def __init__(self, model: str) -> None:
        from xqchat.models import resolve

        self.files: ModelFiles = resolve(model)
        self._spec: ModelSpec | None = None

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            from xqchat.models.weights import open_checkpoint

            self._spec = open_checkpoint(self.files).spec
        return self._spec

    def engine(self, backend: str, device: str, drafter: str = "none") -> None:
        """The backend is installed, a CUDA device exists when asked for, and the drafter is
        there and fits this model."""
        from xqchat.backends.base import pick_backend

        check_device(pick_backend(backend), device)
        check_drafter(drafter, self)

    def fits_context(self, tokens: int, what: str) -> None:
        """Refuse (exit 2) when `tokens`, what the options in `what` ask of the model's context,
        exceed it; `what` reads on into "the context of MODEL (N tokens)"."""
        limit = self.spec.max_context
        if tokens > limit:
            raise click.UsageError(f"{what} the context of {self.files.name} ({limit} tokens)")


def check_device(backend: str, device: str) -> None:
    """--device cuda needs a GPU the chosen backend can use: the backend's own check, which
    imports torch (or mlx) but loads nothing."""
    if device != "cuda":
        return
    if backend == "mlx":
        from xqchat.backends.mlx.model import pick_device
    else:
        from xqchat.backends.cuda.model import pick_device
    pick_device(device)


def check_drafter(option: str, checked: Preflight) -> None:
    """A folder: its config reads, its weights file is a safetensors file, and it was trained for
    this model (each XQError: exit 1). auto needs no check: the drafter next to the model or
    shipped for it was made for it, and without one prompt lookup's beam serves any model."""
    from xqchat.backends.drafter import WEIGHTS, DrafterConfig, drafter_folder

    if option in ("none", "lookup", "auto"):
        return
    folder = drafter_folder(option, checked.files)
    config = DrafterConfig.read(folder)
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), "numpy"):
            pass
    except Exception:  # safetensors raises its own error type for a bad header
        raise XQError(
            f"{folder / WEIGHTS} is truncated or not a safetensors file; train the drafter again"
        ) from None
    config.check(checked.spec, folder)


def read_text_file(path: Path, note: Callable[[str], None]) -> str:
    """A text file as UTF-8. Bytes that are not valid UTF-8 become U+FFFD, with a `note` saying
    how many, so one stray byte does not cost the whole file; an empty file is refused."""
    from xqchat.models.tokenizer import valid_text

    text, replaced = valid_text(path.read_bytes().decode("utf-8", "surrogateescape"))
    if replaced:
        note(f"{path} is not valid UTF-8: {plural(replaced, 'invalid byte')} replaced by U+FFFD")
    if not text.strip():
        raise XQError(f"{path} holds no text")
    return text


def check_utf8_lines(path: Path) -> None:
    """A JSON Lines file must be UTF-8 (RFC 8259): say where it is not, rather than fail with
    a UnicodeDecodeError."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise XQError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); JSON Lines files "
            "are UTF-8"
        ) from None


def read_stdin() -> str:
    """All of stdin. Bytes that are not valid UTF-8 come back as lone surrogates (decoded with
    surrogateescape, as argv is), for valid_text to replace; a strict locale setting would
    raise UnicodeDecodeError instead."""
    stream = sys.stdin
    if stream is None:  # started with stdin closed (`xqchat run - <&-`)
        raise XQError("stdin is closed: pipe the prompt in, or pass it as an argument")
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    try:
        return stream.read()
    except OSError as e:
        raise XQError(f"cannot read the prompt from stdin: {e.strerror or e}") from None


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


ENGINE_OPTIONS = [
    click.option(
        "--model",
        "-m",
        type=ModelName(),
        default="default",
        show_default=True,
        help="Model: default (smollm2-135m), a pulled one (NAMESPACE/REPO, see `xqchat list`), "
        "a model directory or a .gguf file.",
    ),
    click.option(
        "--backend",
        type=click.Choice(["auto", "torch", "mlx", "openai"]),
        default="auto",
        show_default=True,
        help="Engine: auto = MLX on Apple Silicon, else PyTorch (CUDA when present); openai = "
        "a server speaking OpenAI's API, at --url (chat and run only).",
    ),
    click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
    ),
    click.option(
        "--weights",
        type=click.Choice(WEIGHT_DTYPES),
        default="auto",
        show_default=True,
        help="Working dtype of the weights; auto = the fastest on this hardware; int8 = LLM.int8() "
        "(int8 matrices with float outlier features: half the memory of bf16).",
    ),
    click.option(
        "--int8-threshold",
        type=Int8Threshold(),
        default="auto",
        show_default=True,
        help="--weights int8: input features with any |x| above this are multiplied in floating "
        "point (the outlier threshold of LLM.int8). auto = the largest of 6, 4, 3, 2, 1.5, 1, "
        "0.5, 0 that keeps perplexity on a built-in text within 0.5% of the float model's, "
        "measured once per model (about a minute) and kept with its int8 conversion.",
    ),
    click.option(
        "--int8-head/--float-head",
        default=True,
        show_default=True,
        help="--weights int8: the LM head (a tied embedding table) in int8 too, or kept in "
        "floating point.",
    ),
    click.option(
        "--cache",
        type=click.Choice(CACHE_KINDS),
        default="kv",
        show_default=True,
        help="Attention cache: kv = exact K/V; kv-quant = K quantized per channel, V per token; "
        "xquant = the layer input X (GQA: its SVD latents) quantized, K/V rebuilt from it; "
        "xquant-cl = xquant storing each layer's difference from the layer before.",
    ),
    click.option(
        "--bits",
        type=click.Choice(["2", "3", "4", "8"]),
        default="4",
        show_default=True,
        help="Bits per cached value (quantized caches).",
    ),
    click.option(
        "--group",
        type=click.Choice(["32", "64", "128"]),
        default="128",
        show_default=True,
        help="Values sharing one fp16 scale and zero point (quantized caches).",
    ),
    click.option(
        "--mha",
        is_flag=True,
        help="Run a GQA model in its exact MHA form (K/V heads repeated), e.g. to measure xquant "
        "on X itself rather than on the SVD latents.",
    ),
    click.option(
        "--residual",
        type=click.IntRange(min=0),
        default=128,
        show_default=True,
        help="Newest tokens kept exact (quantized caches).",
    ),
    click.option(
        "--cache-sink",
        type=click.IntRange(0, 256),
        default=CacheSpec.sink,
        show_default=True,
        help="First tokens kept exact (quantized caches): attention sinks, which every later "
        "token attends to.",
    ),
]


DRAFTER_OPTIONS = [
    click.option(
        "--drafter",
        type=Drafter(),
        default=EngineOptions.drafter,
        show_default=True,
        help="Speculative decoding: auto (the drafter trained for this model by `xqchat "
        "train-drafter` or shipped with xqchat, else --lookup's beam alone), a drafter folder, "
        "lookup (no drafter, only --lookup's beam: any model, no training), or none. Greedy text "
        "is unchanged; sampling keeps the model's distribution (and a --seed's reply).",
    ),
    click.option(
        "--beam-width",
        type=click.IntRange(1, MAX_BEAM_WIDTH),
        default=EngineOptions.beam_width,
        show_default=True,
        help="Drafter beams per step (the most, with --tree adaptive).",
    ),
    click.option(
        "--beam-length",
        type=click.IntRange(1, MAX_BEAM_LENGTH),
        default=EngineOptions.beam_length,
        show_default=True,
        help="Tokens per drafter beam, the model's own next token included (the most, with "
        "--tree adaptive).",
    ),
    click.option(
        "--lookup",
        type=click.IntRange(0, MAX_LOOKUP),
        default=EngineOptions.lookup,
        show_default=True,
        help="One more beam of up to N tokens beside the drafter's: what followed the last few "
        "tokens where they occurred before in the chat (0: none; the most, with --tree "
        "adaptive).",
    ),
    click.option(
        "--tree",
        type=click.Choice(TREES),
        default=EngineOptions.tree,
        show_default=True,
        help="adaptive: each step verifies the tree, up to the one the options above make, that "
        "pays most as measured on this machine and text, or none (plain decoding) when none "
        "pays; fixed: always the whole tree.",
    ),
]


REMOTE_OPTIONS = [
    click.option(
        "--url",
        default=None,
        help="--backend openai: the server, e.g. http://127.0.0.1:8000/v1 (xqchat serve, "
        "vLLM, llama-server, Ollama's http://127.0.0.1:11434/v1, LM Studio).",
    ),
    click.option(
        "--api-key",
        envvar="OPENAI_API_KEY",
        default=None,
        help="--backend openai: the server's key, if it wants one (also read from OPENAI_API_KEY).",
    ),
]


def remote_options(f):
    for option in reversed(REMOTE_OPTIONS):
        f = option(f)
    return f


def check_remote(ctx: click.Context, local_only: tuple[str, ...]) -> bool:
    """Whether the command talks to a server (--backend openai): then it needs --url, and the
    options in `local_only` that were given would do nothing, so they are refused."""
    remote = ctx.params["backend"] == "openai"
    if not remote:
        if ctx.params["url"] is not None:
            raise click.UsageError("--url applies with --backend openai")
        return False
    if ctx.params["url"] is None:
        raise click.UsageError(
            "--backend openai needs --url, the server's address (e.g. http://127.0.0.1:8000/v1)"
        )
    local = ["--" + name.replace("_", "-") for name in local_only if given(ctx, name)]
    if local:
        raise click.UsageError(f"{', '.join(local)}: for a local model, not --backend openai")
    return True


# engine_options' arguments: every option of ENGINE_OPTIONS and DRAFTER_OPTIONS but --model
ENGINE_KEYS = (
    "backend",
    "device",
    "weights",
    "int8_threshold",
    "int8_head",
    "cache",
    "bits",
    "group",
    "residual",
    "cache_sink",
    "mha",
    "drafter",
    "beam_width",
    "beam_length",
    "lookup",
    "tree",
)


def model_options(f):
    for option in reversed(ENGINE_OPTIONS):
        f = option(f)
    return f


def drafter_options(f):
    for option in reversed(DRAFTER_OPTIONS):
        f = option(f)
    return f


def engine_options(
    backend: str,
    device: str,
    weights: str,
    int8_threshold: float,
    int8_head: bool,
    cache: str,
    bits: str,
    group: str,
    residual: int,
    cache_sink: int,
    mha: bool,
    drafter: str = "none",
    beam_width: int = EngineOptions.beam_width,
    beam_length: int = EngineOptions.beam_length,
    lookup: int = EngineOptions.lookup,
    tree: str = EngineOptions.tree,
) -> EngineOptions:
    try:
        cache_spec = CacheSpec(
            kind=cache, bits=int(bits), group=int(group), residual=residual, sink=cache_sink
        )
        return EngineOptions(
            backend=backend,
            device=device,
            weights=weights,
            int8_threshold=int8_threshold,
            int8_head=int8_head,
            cache=cache_spec,
            mha=mha,
            drafter=None if drafter == "none" else drafter,
            beam_width=beam_width,
            beam_length=beam_length,
            lookup=lookup,
            tree=tree,
        )
    except XQError as e:  # options that contradict each other (--drafter lookup --lookup 0)
        raise click.UsageError(str(e)) from None


def prepare(ctx: click.Context, model: str, **options) -> tuple[Preflight, EngineOptions]:
    """Every check of the engine options that can be made before the model loads: the options
    themselves, the model's name, the backend and device, the drafter, and a --residual that
    the model's context must hold (the cache allocates it up front)."""
    if options["backend"] == "openai":
        raise click.UsageError("--backend openai: only chat and run talk to a server")
    opts = engine_options(**options)
    checked = Preflight(model)
    checked.engine(opts.backend, opts.device, options.get("drafter", "none"))
    if given(ctx, "residual"):
        residual = opts.cache.residual
        checked.fits_context(residual, f"--residual {residual} is more than")
    return checked, opts
