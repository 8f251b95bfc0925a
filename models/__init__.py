"""Framework-free model handling: specs, weight readers, tokenizers, the registry of names."""

from .errors import XQError
from .registry import ModelFiles, resolve
from .spec import ModelSpec, RopeSpec

__all__ = ["XQError", "ModelFiles", "ModelSpec", "RopeSpec", "resolve"]
