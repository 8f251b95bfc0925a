"""The one place that says where xqchat keeps files (platformdirs honours XDG_* on Linux)."""

from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Derived artefacts that can be rebuilt (converted tokenizers, SVD factors)."""
    return Path(platformdirs.user_cache_dir("xqchat", appauthor=False))


def data_dir() -> Path:
    """What the user made and would miss: the chat store."""
    return Path(platformdirs.user_data_dir("xqchat", appauthor=False))


def config_dir() -> Path:
    """Settings the user chose."""
    return Path(platformdirs.user_config_dir("xqchat", appauthor=False))
