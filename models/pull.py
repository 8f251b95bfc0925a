"""`xqchat pull`: fetch a model from the Hugging Face hub into the standard hub cache.

Only what the engine reads is fetched: config, safetensors shards and their index, tokenizer
files, generation config and chat template; or one GGUF file. The refusals (bad name, pickle
weights, unsupported architecture as the hub reports it, gated or missing repo, no network, too
little disk) come before the first weight byte. Each file is written to the cache's blob store through a partial
file that outlives an interruption, so running the pull again resumes it to the byte
(huggingface_hub resumes only within one call and deletes what it had on failure). The result
is checked (spec, every tensor's shape) before the model is named installed."""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .catalog import format_bytes, summary
from .errors import XQError
from .hub import (
    HubName,
    find_installed,
    installed_hint,
    parse_name,
    plan_removal,
    repo_dir,
)
from .paths import hub_cache
from .registry import PICKLE_REASON, PICKLE_SUFFIXES, ModelFiles
from .spec import runnable_architecture, unsupported_architecture

INDEX = "model.safetensors.index.json"
ENGINE_FILES = {
    "config.json",
    "generation_config.json",
    INDEX,
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
}


@dataclass(frozen=True)
class PullProgress:
    """What a pull is doing, for a progress display. `done`/`total` count the bytes of the
    whole pull (a resumed file's earlier bytes count as done)."""

    stage: str  # "download", then "verify", then "prepare"
    file: str = ""
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class Pulled:
    files: ModelFiles
    summary: dict  # catalog.summary: arch, parameters, format, chat_template
    fetched: int  # bytes this pull had to download (0: everything was there already)
    derived: list[str]  # one line per derived artefact prepared


def pull(text: str, progress: Callable[[PullProgress], None] | None = None) -> Pulled:
    """Fetch, check and prepare a model. `progress` may raise (e.g. to cancel): the partial file
    stays, and the next pull resumes it."""
    from huggingface_hub import HfApi, constants

    name = parse_name(text)
    report = progress or (lambda event: None)
    if constants.is_offline_mode():
        raise XQError(f"HF_HUB_OFFLINE is set, so nothing can be pulled; {installed_hint()}")
    with _explained(name):
        info = HfApi().model_info(name.repo_id, revision=name.revision, files_metadata=True)
        if not info.sha:
            raise XQError(f"the hub named no commit for {name}, so it cannot be cached")
        _check_architecture(name, info)
        wanted = _choose(name, info)
        snapshot = repo_dir(name.repo_id) / "snapshots" / info.sha
        if INDEX in wanted:  # the index says which of the repo's safetensors are this model
            wanted = _shards_from_index(name, info, wanted, snapshot)
        todo = {f: size for f, size in wanted.items() if not (snapshot / f).exists()}
        _check_disk_space(name, sum(todo.values()))
        counter = _Counter(sum(todo.values()), report)
        for filename in sorted(todo, key=lambda f: (f.endswith((".safetensors", ".gguf")), f)):
            _fetch(name.repo_id, info.sha, filename, counter)
    if name.gguf:
        files = ModelFiles(str(name), snapshot / name.gguf, "gguf")
    else:
        files = ModelFiles(str(name), snapshot, "safetensors")
    report(PullProgress("verify"))
    try:
        checkpoint = verify(files)
    except XQError as e:
        removal = plan_removal(
            f"{name.repo_id}@{info.sha}" + (f":{name.gguf}" if name.gguf else "")
        )
        removal.run()
        raise XQError(f"{name} does not load ({e}); its downloaded files were removed") from None
    if not re.fullmatch(r"[0-9a-f]{40}", name.revision or ""):
        ref = repo_dir(name.repo_id) / "refs" / (name.revision or "main")
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(info.sha)  # only now: until the new snapshot is checked, the old one runs
    files = find_installed(str(name))
    about = summary(files, checkpoint)
    report(PullProgress("prepare"))
    return Pulled(files, about, counter.done - counter.resumed, prepare_derived(files))


def verify(files: ModelFiles):
    """The model loads: its spec parses and every tensor the engine reads has the right shape.
    Returns the open checkpoint."""
    from .weights import check_shapes, open_checkpoint

    checkpoint = open_checkpoint(files)
    check_shapes(checkpoint)
    return checkpoint


def prepare_derived(files: ModelFiles) -> list[str]:
    """Build, once per model, what the engine derives from its weights, so the first chat starts
    at once. Returns one line per artefact for the user. Artefacts belong in
    `paths.derived_dir(files)`, which `xqchat show` lists and `xqchat rm` deletes with the model.

    Today: the tokenizer (a GGUF file's is converted from its metadata and cached; a safetensors
    model's is loaded once, which checks it). Next: XQuant's SVD factors for GQA models."""
    from .tokenizer import converted_tokenizer_dir, load_tokenizer

    load_tokenizer(files)
    if files.format == "gguf":
        return [f"tokenizer converted from the GGUF metadata: {converted_tokenizer_dir(files)}"]
    return []


@contextmanager
def _explained(name: HubName) -> Iterator[None]:
    """The hub's and the network's failures as one line that says what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = name.repo_id
    try:
        yield
    except GatedRepoError:
        raise XQError(
            f"{repo} is gated: accept its conditions at {constants.ENDPOINT}/{repo}, then log in "
            "with `hf auth login` (or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise XQError(f"{repo} has no revision '{name.revision}'") from None
    except RepositoryNotFoundError:
        raise XQError(
            f"no model '{repo}' on the Hugging Face hub (if it is private, log in with "
            "`hf auth login`)"
        ) from None
    except (httpx2.ConnectError, httpx2.ConnectTimeout, OfflineModeIsEnabled) as e:
        raise XQError(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({_reason(e)}); "
            f"{installed_hint()}"
        ) from None
    except HfHubHTTPError as e:
        raise XQError(f"the hub refused {name}: {_reason(e)}") from None
    except (httpx2.TransportError, OSError) as e:
        raise XQError(
            f"the download of {name} stopped ({_reason(e)}); run `xqchat pull {name}` again to "
            "resume it"
        ) from None


def _reason(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_architecture(name: HubName, info) -> None:
    # The hub reports a repo's model_type (and a GGUF repo's architecture): refuse before
    # downloading gigabytes. The spec check after the download is the final word.
    described = (info.gguf or {}) if name.gguf else (info.config or {})
    arch = described.get("architecture" if name.gguf else "model_type")
    if arch and not runnable_architecture(arch):
        raise unsupported_architecture(arch)


def _sizes(info) -> dict[str, int]:
    return {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in info.siblings or []}


def _choose(name: HubName, info) -> dict[str, int]:
    """filename -> size of what the engine needs from this repo; refuses what it cannot run."""
    sizes = _sizes(info)
    ggufs = sorted(f for f in sizes if f.endswith(".gguf"))
    if name.gguf:
        if name.gguf not in sizes:
            listed = f"; its GGUF files: {', '.join(ggufs[:6])}" if ggufs else ""
            raise XQError(f"{name.repo_id} has no file {name.gguf}{listed}")
        if re.search(r"-\d{5}-of-\d{5}\.gguf$", name.gguf):
            raise XQError(f"{name.gguf} is one part of a split GGUF; pull a single-file one")
        return {name.gguf: sizes[name.gguf]}
    top = {f: size for f, size in sizes.items() if "/" not in f}
    if not any(f.endswith(".safetensors") for f in top):
        if ggufs:
            raise XQError(
                f"{name} has GGUF files, not safetensors: pull one of them, "
                f"e.g. `xqchat pull {name}:{ggufs[0]}`"
            )
        pickles = [f for f in top if Path(f).suffix in PICKLE_SUFFIXES]
        if pickles:
            raise XQError(f"{name} has only pickle weights ({pickles[0]}): {PICKLE_REASON}")
        raise XQError(f"{name} has no model weights (*.safetensors or *.gguf)")
    if "config.json" not in top:
        raise XQError(f"{name} has no config.json")
    if "tokenizer.json" not in top and "tokenizer.model" not in top:
        raise XQError(f"{name} has no tokenizer (tokenizer.json or tokenizer.model)")
    return {f: size for f, size in top.items() if f in ENGINE_FILES or f.endswith(".safetensors")}


def _shards_from_index(name: HubName, info, wanted: dict[str, int], snapshot: Path) -> dict:
    from .weights import index_shards

    _fetch(name.repo_id, info.sha, INDEX, _Counter(0, lambda event: None))
    shards = index_shards(snapshot / INDEX)
    absent = [shard for shard in shards if shard not in wanted]
    if absent:
        raise XQError(f"{name}'s {INDEX} names {absent[0]}, which the repo does not have")
    return {f: s for f, s in wanted.items() if not f.endswith(".safetensors") or f in shards}


def _check_disk_space(name: HubName, needed: int) -> None:
    where = hub_cache()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise XQError(
            f"not enough disk space for {name}: it needs {format_bytes(needed)}, "
            f"{where} has {format_bytes(free)} free"
        )


class _Counter:
    """Bytes of the whole pull, reported as they arrive."""

    def __init__(self, total: int, report: Callable[[PullProgress], None]):
        self.total, self.report = total, report
        self.done = self.resumed = 0

    def add(self, n: int, file: str) -> None:
        self.done += n
        self.report(PullProgress("download", file, self.done, self.total))


class _Meter:
    """Stands in for the progress bar huggingface_hub's http_get drives."""

    def __init__(self, counter: _Counter, file: str, **_):
        self.counter, self.file = counter, file

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        self.counter.add(n, self.file)


def _fetch(repo_id: str, commit: str, filename: str, counter: _Counter) -> None:
    """One file into the hub cache, resuming a partial download left by an earlier pull."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(repo_id, filename, revision=commit)
    meta = get_hf_file_metadata(url)  # HEAD: the content hash (etag), size and where the bytes are
    if not meta.etag:
        raise XQError(f"the hub sent no ETag for {filename}, so it cannot be cached")
    repo = repo_dir(repo_id)
    blob = repo / "blobs" / meta.etag
    lock = hub_cache() / ".locks" / repo.name / f"{meta.etag}.lock"  # the one hf_hub_download takes
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.exists():
            partial = blob.with_name(blob.name + ".incomplete")
            headers = build_hf_headers()
            if urlsplit(meta.location).hostname != urlsplit(url).hostname:
                headers.pop("authorization", None)  # a signed CDN link needs no hub token
            with open(partial, "ab") as f:
                if meta.size is not None and f.tell() > meta.size:
                    f.seek(0)  # longer than the file: not a prefix of it, start over
                    f.truncate()
                have = f.tell()
                counter.resumed += have
                counter.add(have, filename)
                http_get(
                    meta.location,
                    f,
                    resume_size=have,
                    headers=headers,
                    expected_size=meta.size,
                    displayed_filename=filename,
                    tqdm_class=functools.partial(_Meter, counter, filename),
                )
            partial.replace(blob)
    # The blob is in place: this only links it into the snapshot, the way the cache expects.
    hf_hub_download(repo_id, filename, revision=commit, cache_dir=hub_cache())
