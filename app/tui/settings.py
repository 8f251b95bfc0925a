"""The user's settings: one JSON file in the user config dir, validated when read. A bad setting
is reset to its default and named, the others kept; a file that is not a JSON object at all (or
cannot be read) gives the defaults. Either way the file as found is kept beside as
`settings.json.broken` (`settings.json.broken-<time>` when that is taken) and a repaired one is
written.

Only the settings that differ from their defaults are saved (with the file's VERSION), so a
default that changes reaches everyone who left it alone. Files from before VERSION held every
setting: there a value that was then the default (PAST_DEFAULTS) counts as never chosen.

Each field carries what the settings screen shows (label, help, choices), so offering a new
option (int8 weights, the drafter, another cache kind) is one line here, or none where the
choices come from the engine's own lists."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xqchat.app.options import MIN_TEMPERATURE
from xqchat.backends import int8
from xqchat.backends.base import (
    CACHE_KINDS,
    TREES,
    WEIGHT_DTYPES,
    CacheSpec,
    EngineOptions,
    GenerationConfig,
)
from xqchat.backends.chat import OVERFLOW_POLICIES, ContextPolicy
from xqchat.models import hub
from xqchat.models.paths import config_dir
from xqchat.models.registry import DEFAULT_MODEL

VERSION = 2  # of settings.json: 1 (no "version" key) held every setting, 2 only the changed ones
# defaults that were once something else: a file of version 1 holding the old value was saved
# whole with it, not chosen (drafter none: before speculation was on by default)
PAST_DEFAULTS = {"drafter": ["none"], "int8_threshold": [6.0], "beam_width": [4, 2]}


def installed_models() -> list[str]:
    """The models the picker offers: those `xqchat list` lists (the default model when it is
    installed, then every pulled one), found without opening their weights."""
    return [model.files.name for model in hub.installed_models()]


@dataclass(frozen=True)
class Option:
    label: str
    help: str
    choices: Callable[[], Sequence] | None = None  # the value must be one of these
    suggest: Callable[[], Sequence] | None = None  # offered in a picker; any value is allowed
    low: float | None = None
    high: float | None = None
    where: str = "both"  # local | remote | both: for which backends the setting means something


def setting(default: Any, label: str, help: str, **option: Any) -> Any:
    """A Settings field: its default and what the settings screen shows for it."""
    return field(default=default, metadata={"option": Option(label, help, **option)})


@dataclass(frozen=True)
class Settings:
    model: str = setting(
        DEFAULT_MODEL,
        "Model",
        "A model name (F4 pulls one from the hub), a model directory or a .gguf file.",
        suggest=installed_models,
    )
    backend: str = setting(
        "auto",
        "Backend",
        "auto = MLX on Apple Silicon, else PyTorch; openai = a server speaking OpenAI's API "
        "(xqchat serve, vLLM, llama-server, Ollama, LM Studio) at the URL below.",
        choices=lambda: ("auto", "torch", "mlx", "openai"),
    )
    url: str = setting(
        "",
        "Server URL",
        "backend openai: the server, e.g. http://127.0.0.1:8000/v1 (its key, if it wants one, "
        "comes from OPENAI_API_KEY or `xqchat chat --api-key`).",
        where="remote",
    )
    device: str = setting(
        "auto",
        "Device",
        "Where PyTorch runs.",
        choices=lambda: ("auto", "cpu", "cuda"),
        where="local",
    )
    weights: str = setting(
        "auto",
        "Weights",
        "Working dtype of the weights; auto = the fastest here; int8 = LLM.int8() (half of "
        "bf16's memory).",
        choices=lambda: WEIGHT_DTYPES,
        where="local",
    )
    int8_threshold: str = setting(
        "auto",
        "int8 outliers",
        "int8 weights: input features with any |x| above this are multiplied in floating point; "
        "auto = the largest that keeps the model within 0.5% of its float perplexity.",
        suggest=lambda: ("auto", "6", "3", "1.5"),
        where="local",
    )
    int8_head: bool = setting(
        True,
        "int8 head",
        "int8 weights: the LM head (a tied embedding table) in int8 too.",
        where="local",
    )
    mha: bool = setting(
        False,
        "MHA form",
        "Run a GQA model in its exact MHA form (K/V heads repeated): xquant then caches X "
        "itself rather than the SVD latents.",
        where="local",
    )
    cache: str = setting(
        "kv",
        "Cache",
        "kv = exact K/V; kv-quant = K per channel, V per token (KIVI); xquant = the layer input "
        "X (GQA: its SVD latents), quantized, K/V rebuilt from it; xquant-cl = xquant storing "
        "each layer's difference from the one before.",
        choices=lambda: CACHE_KINDS,
        where="local",
    )
    bits: int = setting(
        4,
        "Cache bits",
        "Bits per cached value (quantized caches).",
        choices=lambda: (2, 3, 4, 8),
        where="local",
    )
    group: int = setting(
        128,
        "Cache group",
        "Values sharing one fp16 scale and zero point.",
        choices=lambda: (32, 64, 128),
        where="local",
    )
    residual: int = setting(
        128,
        "Exact window",
        "Newest tokens kept exact (quantized caches).",
        low=0,
        where="local",
    )
    cache_sink: int = setting(
        4,
        "Exact first",
        "First tokens kept exact (quantized caches).",
        low=0,
        high=256,
        where="local",
    )
    drafter: str = setting(
        EngineOptions.drafter,
        "Drafter",
        "Speculative decoding: auto (the drafter trained for this model or shipped with xqchat, "
        "else the lookup beam alone), a drafter folder, lookup (no drafter, only the lookup "
        "beam: any model), or none. Greedy replies are unchanged; sampled ones keep the model's "
        "distribution.",
        suggest=lambda: ("none", "auto", "lookup"),
        where="local",
    )
    beam_width: int = setting(
        EngineOptions.beam_width,
        "Beam width",
        "Drafter beams per step.",
        low=1,
        where="local",
    )
    beam_length: int = setting(
        EngineOptions.beam_length,
        "Beam length",
        "Tokens per drafter beam, the model's own next token included.",
        low=1,
        where="local",
    )
    lookup: int = setting(
        EngineOptions.lookup,
        "Lookup",
        "One more beam of up to this many tokens beside the drafter's: what followed the last "
        "few tokens where they occurred before in the chat (0: none).",
        low=0,
        where="local",
    )
    tree: str = setting(
        EngineOptions.tree,
        "Tree",
        "adaptive: each step verifies the part of the drafter's and lookup's tree that pays most "
        "as measured, or none when none pays (the status bar says which); fixed: the whole tree.",
        choices=lambda: TREES,
    )
    temperature: float = setting(0.0, "Temperature", "0 = greedy (deterministic).", low=0, high=2)
    top_p: float = setting(
        1.0, "Top-p", "Nucleus sampling mass (with temperature > 0).", low=0.01, high=1
    )
    max_tokens: int = setting(512, "Max tokens", "Most tokens in one reply.", low=1)
    overflow: str = setting(
        "stop",
        "Context overflow",
        "When a chat outgrows the context: stop = refuse with a message; drop-oldest = leave out "
        "whole oldest turns; sink-window = keep the first tokens and a recent window.",
        choices=lambda: OVERFLOW_POLICIES,
        where="local",
    )
    sink: int = setting(
        4, "Sink tokens", "sink-window: first tokens always kept.", low=0, where="local"
    )
    window: int = setting(
        0,
        "Window tokens",
        "sink-window: newest tokens kept at a cut (0 = half the context).",
        low=0,
        where="local",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check(f, getattr(self, f.name))

    def engine_options(self) -> EngineOptions:
        cache = CacheSpec(
            kind=self.cache,
            bits=self.bits,
            group=self.group,
            residual=self.residual,
            sink=self.cache_sink,
        )
        return EngineOptions(
            backend=self.backend,
            device=self.device,
            weights=self.weights,
            int8_threshold=int8.parse_threshold(self.int8_threshold),
            int8_head=self.int8_head,
            cache=cache,
            mha=self.mha,
            drafter=None if self.drafter == "none" else self.drafter,
            beam_width=self.beam_width,
            beam_length=self.beam_length,
            lookup=self.lookup,
            tree=self.tree,
        )

    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p
        )

    def policy(self) -> ContextPolicy:
        return ContextPolicy(overflow=self.overflow, sink=self.sink, window=self.window)


def option(f: dataclasses.Field) -> Option:
    return f.metadata["option"]


def check(f: dataclasses.Field, value: object) -> None:
    """Raise ValueError with a line the user can read if `value` does not suit field `f`."""
    kind, opt = type(f.default), option(f)
    if f.name == "int8_threshold":  # "auto" or a number (as settings before auto saved it)
        try:
            int8.parse_threshold(value)
        except ValueError as e:
            raise ValueError(f"{f.name}: {e}") from None
        return
    ok_type = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok_type = True
    if not ok_type:
        raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # NaN passes every comparison below
        raise ValueError(f"{f.name}: {value!r} is not a finite number")
    if f.name == "temperature" and 0 < value < MIN_TEMPERATURE:  # as the command line refuses it
        raise ValueError(
            f"{f.name}: {value!r} is too small: use 0 (greedy) or at least {MIN_TEMPERATURE:g}"
        )
    if opt.choices is not None and value not in opt.choices():
        raise ValueError(f"{f.name}: {value!r} is not one of {', '.join(map(str, opt.choices()))}")
    if opt.low is not None and value < opt.low or opt.high is not None and value > opt.high:
        raise ValueError(f"{f.name}: {value!r} is outside {opt.low}..{opt.high or '∞'}")
    if kind is str and not value.strip() and f.name != "url":  # no URL: no server chosen
        raise ValueError(f"{f.name}: empty")


def default_path() -> Path:
    return config_dir() / "settings.json"


def load(path: Path) -> tuple[Settings, str | None]:
    """The settings in `path` (defaults when there is none), and a problem to report, if any."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return Settings(), None  # nothing saved yet (a file in the folder's place: see `save`)
    except (OSError, ValueError) as e:  # a folder in its place, no permission, not UTF-8
        return replaced(path, Settings(), f"{path} was broken ({reason(e)}); using the defaults")
    try:
        data = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return replaced(path, Settings(), f"{path} was broken ({e}); using the defaults")
    if not isinstance(data, dict):
        return replaced(
            path, Settings(), f"{path} was broken (not a JSON object); using the defaults"
        )
    settings, problems = repaired(migrated(data))
    if not problems:
        return settings, None
    return replaced(
        path, settings, f"{path} was broken in part: {'; '.join(problems)}. Kept the other settings"
    )


def migrated(data: dict) -> dict:
    """The settings a file holds, as chosen: without its version, and for a file of version 1
    (saved whole) without the values that were the defaults then."""
    data = dict(data)
    if data.pop("version", 1) != 1:
        return data
    return {
        name: value
        for name, value in data.items()
        if not any(value == old and type(value) is type(old) for old in PAST_DEFAULTS.get(name, []))
    }


def repaired(data: dict) -> tuple[Settings, list[str]]:
    """`data` as Settings, each bad value reset to its default and each unknown name dropped,
    and a line for each (which setting, what was wrong, what it became)."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    kept: dict[str, object] = {}
    problems: list[str] = []
    for name, value in data.items():
        if name not in fields:
            problems.append(f"{name!r}: unknown setting (dropped)")
            continue
        try:
            check(fields[name], value)
        except ValueError as e:
            problems.append(f"{e} (reset to {fields[name].default!r})")
        else:
            kept[name] = value
    return Settings(**kept), problems  # every field is checked on its own: no pair can clash


def replaced(path: Path, settings: Settings, problem: str) -> tuple[Settings, str]:
    """Keep the file at `path` beside, write `settings` in its place, and say so after
    `problem`. Nothing is overwritten: where the old file cannot be moved, nothing is saved."""
    try:
        broken = keep_aside(path)
    except OSError as e:
        return (
            settings,
            f"{problem}; it could not be moved aside ({reason(e)}), so it is left as is",
        )
    try:
        save(settings, path)
    except OSError as e:
        return settings, f"{problem} (old file: {broken.name}); saving failed: {reason(e)}"
    return settings, f"{problem} (old file: {broken.name})"


def keep_aside(path: Path) -> Path:
    """Rename `path` to `<name>.broken`, or `<name>.broken-<time>[-n]` if that is taken."""
    broken = path.with_name(path.name + ".broken")
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    while broken.exists() or broken.is_symlink():  # an older broken file stays too
        broken = path.with_name(f"{path.name}.broken-{stamp}{f'-{n}' if n > 1 else ''}")
        n += 1
    path.rename(broken)
    return broken


def reason(error: Exception) -> str:
    """What went wrong, without the path the message names already."""
    return getattr(error, "strerror", None) or str(error)


def save(settings: Settings, path: Path) -> None:
    """Write the settings that differ from the defaults to `path`; OSError if the folder cannot
    be made or written."""
    changed = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != f.default
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": VERSION, **changed}, indent=2) + "\n")
    tmp.replace(path)  # a crash mid-write never leaves a half-written file
