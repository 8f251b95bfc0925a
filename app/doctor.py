"""`xqchat doctor`: one screen that says what this machine offers, what xqchat will use on it,
where its files are and how big, the models installed, and the fix for each problem found. It
asks the engine (backends.base.hardware) and the models layer; it loads no model."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import click

from xqchat.backends.base import hardware
from xqchat.models import paths
from xqchat.models.catalog import format_bytes, listing
from xqchat.models.errors import XQError
from xqchat.models.registry import SUGGESTED_PULL, default_model_install, install_command

from .loading import status

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
WITHOUT_C_PASSES = (
    "without them q4/q8 and int8 weights, XQuant caches and bf16 decode attention run as torch "
    "ops: the same replies, slower (the default model decoded 3.9x slower on a 2-core CPU)"
)


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def folder_bytes(path: Path) -> int | None:
    """The bytes of the files under `path` (links not followed: the hub cache's snapshots link to
    its blobs), or None when it does not exist yet."""
    if not path.exists():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def directories() -> dict[str, dict]:
    where = {
        "data": paths.data_dir(),
        "config": paths.config_dir(),
        "cache": paths.cache_dir(),
        "hub cache": paths.hub_cache(),
        "exports": paths.exports_dir(),
    }
    return {name: {"path": str(path), "bytes": folder_bytes(path)} for name, path in where.items()}


def unwritable(path: Path) -> bool:
    """Whether xqchat could not write there: the folder, or the nearest one above it that exists
    (xqchat makes the rest)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return not os.access(path, os.W_OK)


def engine_fix(backend: str) -> str:
    """How to get the engine `backend` names (auto: this platform's) here."""
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if backend == "mlx" or (backend == "auto" and apple):
        return install_command("mlx" if apple else "'xqchat[mlx]'")
    if sys.platform == "darwin":
        return "none: PyTorch stopped supporting Intel Macs at 2.2 and MLX needs Apple Silicon"
    if sys.platform == "linux":  # PyPI's torch for Linux brings GBs of CUDA packages
        return f"{install_command('torch')} --index-url {CPU_TORCH_INDEX} (CPU only), or " + (
            install_command("'xqchat[cuda]'") + " for an NVIDIA GPU"
        )
    return install_command("torch")


def examine(backend: str = "auto") -> dict:
    """Everything the doctor shows, as a JSON-ready dict; `problems` holds (problem, fix) pairs."""
    problems: list[dict] = []

    def problem(what: str, fix: str) -> None:
        problems.append({"problem": what, "fix": fix})

    try:
        engine = hardware(backend)
    except XQError as e:  # no engine installed (or the one asked for is missing)
        engine = None
        problem(str(e), engine_fix(backend))
    if engine is not None and engine["backend"] == "torch":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        if apple and backend == "auto":
            problem("MLX is not installed: PyTorch runs on the CPU here", install_command("mlx"))
        if engine["cuda"] is None and shutil.which("nvidia-smi"):
            problem(
                f"an NVIDIA GPU is here but torch {engine['torch']} has no CUDA: xqchat runs on "
                "the CPU",
                install_command("'xqchat[cuda]'") + " (PyPI's torch for Linux is a CUDA build)",
            )
        c_passes = engine["cpu_paths"]["c_passes"]
        if c_passes == "off" and not os.environ.get("XQCHAT_NO_CPU_KERNELS"):
            compiler = engine["compiler"]
            if compiler is None:
                problem(f"no C compiler for the CPU passes: {WITHOUT_C_PASSES}", compiler_fix())
            else:
                problem(
                    f"the CPU passes did not compile with {compiler}: {WITHOUT_C_PASSES}",
                    "install gcc or clang and set CC to it (e.g. CC=gcc)",
                )
    dirs = directories()
    for name in ("data", "config", "cache"):
        if unwritable(Path(dirs[name]["path"])):
            problem(f"the {name} dir {dirs[name]['path']} is not writable", "fix its permissions")
    models = [
        {key: row.get(key) for key in ("name", "format", "size_bytes", "path", "error")}
        for row in listing()
    ]
    for row in models:
        if row["error"]:
            problem(
                f"{row['name']}: {row['error']}", f"xqchat rm {row['name']}, then pull it again"
            )
    if not models:
        problem(
            "no model is installed",
            f"{default_model_install()} (the default model), or xqchat pull {SUGGESTED_PULL}",
        )
    return {
        "xqchat": version("xqchat"),
        "python": f"{platform.python_version()} ({sys.executable})",
        "engine": engine,
        "other_backends": {
            name: version(name)
            for name in ("torch", "mlx")
            if engine is None or name != engine["backend"]
        },
        "directories": dirs,
        "models": models,
        "problems": problems,
    }


def compiler_fix() -> str:
    if sys.platform == "darwin":
        return "xcode-select --install (Apple's command line tools)"
    if sys.platform == "linux":
        return "install gcc: sudo apt install gcc (Debian, Ubuntu), sudo dnf install gcc (Fedora)"
    return "put gcc or clang on PATH (e.g. from MSYS2), or set CC to one"


def hardware_lines(report: dict) -> list[tuple[str, str]]:
    """The engine report (backends.base.hardware) as (label, value) lines."""
    cpu = report["cpu"]
    lines = [
        ("cpu", f"{cpu['model']} ({cpu['arch']}, {cpu['level']})"),
        ("features", " ".join(cpu["features"]) or "none the engine uses"),
    ]
    if cpu["capped_by"]:
        lines.append(("capped by", cpu["capped_by"]))
    rest = {key: value for key, value in report.items() if key not in ("cpu", "cpu_paths")}
    lines += [(key, "none" if value is None else str(value)) for key, value in rest.items()]
    paths = report.get("cpu_paths", {})
    lines += [
        (key.replace("_", " "), str(value))
        for key, value in paths.items()
        if key not in ("cpu", "measured_ms")
    ]
    if paths.get("measured_ms"):
        timed = ", ".join(f"{name} {ms:g}" for name, ms in paths["measured_ms"].items())
        lines.append(("timed (ms)", timed))
    return lines


def size(n: int | None) -> str:
    return "not made yet" if n is None else format_bytes(n)


def render(report: dict) -> list[str]:
    """The doctor's screen: sections of right-aligned labels, then the problems and their fixes."""
    sections = {
        "engine": hardware_lines(report["engine"]) if report["engine"] else [("backend", "none")],
    }
    others = [f"{name} {v}" for name, v in report["other_backends"].items() if v]
    sections["engine"].append(("also installed", ", ".join(others) or "no other backend"))
    sections["directories"] = [
        (name, f"{d['path']}  ({size(d['bytes'])})") for name, d in report["directories"].items()
    ]
    sections["models"] = [
        (row["name"], f"{row['format']}, {format_bytes(row['size_bytes'])}  {row['path']}")
        for row in report["models"]
    ] or [("none", "")]
    lines = [f"xqchat {report['xqchat']}, Python {report['python']}"]
    for title, rows in sections.items():
        lines += ["", title, *(f"{key:>15}  {value}".rstrip() for key, value in rows)]
    lines += ["", "problems" if report["problems"] else "no problems found"]
    for found in report["problems"]:
        lines += [f"  - {found['problem']}", f"    fix: {found['fix']}"]
    return lines


@click.command(epilog="\b\nExamples:\n  xqchat doctor\n  xqchat doctor --json")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "mlx"]),
    default="auto",
    help="The engine to examine (auto: the one xqchat uses here).",
)
def doctor(as_json, backend):
    """What this machine offers and what xqchat uses on it: backend, device, CPU features and
    the paths chosen (timed here: a second or two), the C compiler, the data, config and cache
    dirs with their sizes, the installed models, and the fix for each problem found."""
    status("examining this machine …")
    report = examine(backend)
    status("")
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(render(report)))
