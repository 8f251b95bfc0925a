"""The one place that says where xqchat keeps files (platformdirs honours XDG_* on Linux)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

if TYPE_CHECKING:
    from .registry import ModelFiles


def cache_dir() -> Path:
    """Derived artefacts that can be rebuilt (converted tokenizers, SVD factors)."""
    return Path(platformdirs.user_cache_dir("xqchat", appauthor=False))


def data_dir() -> Path:
    """What the user made and would miss: the chat store, and when each model was last used."""
    return Path(platformdirs.user_data_dir("xqchat", appauthor=False))


def hub_cache() -> Path:
    """The standard Hugging Face hub cache (HF_HUB_CACHE, HF_HOME), where pulled models live."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def derived_dir(files: ModelFiles) -> Path:
    """Where artefacts computed from a model live: keyed by the hub snapshot's commit for a pulled
    model (`rm` deletes them with it), by the file's identity for any other path."""
    try:
        repo, snapshots, commit, *inside = files.path.relative_to(hub_cache()).parts
    except ValueError:
        repo = snapshots = ""
    if repo.startswith("models--") and snapshots == "snapshots":
        return cache_dir() / "derived" / repo / commit / ("--".join(inside) or "safetensors")
    st = files.path.stat()
    key = hashlib.sha256(f"{files.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_dir() / "derived" / "local" / key.hexdigest()[:16]


def config_dir() -> Path:
    """Settings the user chose."""
    return Path(platformdirs.user_config_dir("xqchat", appauthor=False))


def exports_dir() -> Path:
    """Where F5 writes a chat as Markdown: ~/Documents/xqchat (the user's documents folder as
    platformdirs finds it, e.g. from XDG user-dirs on Linux). An export is a document the user
    means to open, share or keep, so it goes where they look for documents, not into the hidden
    data dir; unlike the current directory, it does not depend on where xqchat was started."""
    return Path(platformdirs.user_documents_dir()) / "xqchat"
