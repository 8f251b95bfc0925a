"""The one place that says where xqchat keeps files (platformdirs honours XDG_* on Linux)."""

from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Derived artefacts that can be rebuilt (converted tokenizers, SVD factors)."""
    return Path(platformdirs.user_cache_dir("xqchat", appauthor=False))
