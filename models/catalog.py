"""What the installed models are, at a glance: architecture, parameters, format, size, chat
template, derived artefacts and when each was last used. `xqchat list` and `xqchat show` print
these records; the TUI's model picker reads the same ones."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

from .errors import XQError
from .hub import installed_models
from .paths import cache_dir, data_dir, derived_dir
from .registry import ModelFiles

SUMMARY_KEYS = {"arch", "parameters", "format", "chat_template"}


def listing() -> list[dict]:
    """One record per installed model: name (what --model takes), architecture, parameters,
    size_bytes, format, chat_template, last_used (ISO time or None), path; a model that cannot be
    read is listed too, with `error` saying why."""
    rows = []
    for model in installed_models():
        try:
            about = summary(model.files)
        except XQError as e:
            about = {"arch": "?", "parameters": None, "format": "?", "chat_template": None}
            about["error"] = str(e)
        rows.append(
            {
                "name": model.files.name,
                "architecture": about.pop("arch"),
                **about,
                "size_bytes": model.size,
                "last_used": last_used(model.files.name),
                "path": str(model.files.path),
            }
        )
    return rows


def details(files: ModelFiles) -> dict:
    """Everything `xqchat show` prints: the spec, files with sizes, chat template, derived
    artefacts, last use."""
    from .weights import open_checkpoint

    checkpoint = open_checkpoint(files)
    spec, about = checkpoint.spec, summary(files, checkpoint)
    root = files.path if files.path.is_dir() else files.path.parent
    paths = (
        sorted(p for p in root.rglob("*") if p.is_file()) if files.path.is_dir() else [files.path]
    )
    spec_fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "rope"}
    return {
        "name": files.name,
        "path": str(files.path),
        "architecture": spec.arch,
        "parameters": about["parameters"],
        "format": about["format"],
        "chat_template": about["chat_template"],
        "spec": spec_fields | {"rope_theta": spec.rope.theta, "rope_type": spec.rope.type},
        "files": {p.relative_to(root).as_posix(): p.stat().st_size for p in paths},
        "derived": [str(p) for p in derived_artefacts(files)],
        "last_used": last_used(files.name),
    }


def derived_artefacts(files: ModelFiles) -> list[Path]:
    """What xqchat has computed from this model so far (converted tokenizer, SVD factors, ...)."""
    folder = derived_dir(files)
    return sorted(folder.iterdir()) if folder.is_dir() else []


def summary(files: ModelFiles, checkpoint=None) -> dict:
    """arch, parameters, format ("safetensors bf16", "gguf Q4_1") and chat_template (bool), from
    `checkpoint` if it is already open. A GGUF file's summary is cached: opening one takes
    seconds."""
    from .weights import open_checkpoint

    if files.format == "safetensors":
        return _safetensors_summary(files.path, checkpoint or open_checkpoint(files))
    st = files.path.stat()
    key = f"{files.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = cache_dir() / "summaries.json"
    cached = _read_json(cache_file)
    if not (isinstance(cached.get(key), dict) and SUMMARY_KEYS <= cached[key].keys()):
        cached[key] = _gguf_summary(checkpoint or open_checkpoint(files))
        _write_json(cache_file, cached)
    return dict(cached[key])


def _safetensors_summary(folder: Path, checkpoint) -> dict:
    shapes, elements = checkpoint.shapes(), {}
    for name, dtype in checkpoint.dtypes().items():
        elements[dtype] = elements.get(dtype, 0) + math.prod(shapes[name])
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    template_files = ("chat_template.jinja", "chat_template.json")
    return {
        "arch": checkpoint.spec.arch,
        "parameters": sum(elements.values()),
        "format": f"safetensors {max(elements, key=elements.get).lower() if elements else '?'}",
        "chat_template": bool(tokenizer_config.get("chat_template"))
        or any((folder / name).is_file() for name in template_files),
    }


def _gguf_summary(checkpoint) -> dict:
    import gguf

    try:
        quant = gguf.LlamaFileType(int(checkpoint.meta["general.file_type"])).name
    except (KeyError, TypeError, ValueError):
        quant = "?"
    return {
        "arch": checkpoint.spec.arch,
        "parameters": sum(t.n_elements for t in checkpoint.tensor_table),
        "format": f"gguf {quant.removeprefix('MOSTLY_')}",
        "chat_template": bool(checkpoint.meta.get("tokenizer.chat_template")),
    }


# Last use lives in a small JSON file in the user data dir; a broken file is ignored, never fatal.


def _usage_file() -> Path:
    return data_dir() / "usage.json"


def record_use(name: str) -> None:
    data = _read_json(_usage_file())
    last = data.get("last_used") if isinstance(data.get("last_used"), dict) else {}
    data["last_used"] = {**last, name: time.time()}
    _write_json(_usage_file(), data)


def last_used(name: str) -> str | None:
    """Local time of the last run or bench with this model (ISO, to the second), or None."""
    last = _read_json(_usage_file()).get("last_used")
    when = last.get(name) if isinstance(last, dict) else None
    try:
        return datetime.fromtimestamp(when).isoformat(" ", "seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data, indent=1))
        partial.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only or full disk loses a timestamp, never a chat


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
