"""A stand-in for the Hugging Face hub on 127.0.0.1: the parts of its HTTP API that
huggingface_hub calls for a pull. Model info (`/api/models/{repo}[/revision/{rev}]`, with
siblings, sizes and the commit sha), and `/{repo}/resolve/{rev}/{file}` for HEAD and GET with
ETag, X-Repo-Commit, Content-Length and Range. Errors carry the hub's X-Error-Code header, which
huggingface_hub turns into RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError.

It records every request, and can drop a connection once in the middle of a file."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
CHUNK = 1 << 20  # huggingface_hub's download chunk, made small so a cut lands mid-file


@dataclass
class Repo:
    folder: Path
    sha: str
    gated: bool = False
    config: dict | None = None  # what model info reports under "config" (the hub's parse)
    gguf: dict | None = None
    refs: dict[str, str] = field(default_factory=dict)  # extra branch/tag names -> sha

    def files(self) -> dict[str, Path]:
        return {
            p.relative_to(self.folder).as_posix(): p
            for p in sorted(self.folder.rglob("*"))
            if p.is_file()
        }

    def knows(self, revision: str) -> bool:
        return revision in ("main", self.sha) or revision in self.refs


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        # (method, path, Range header) of model-info and file requests; of any other request
        # (huggingface_hub also asks for a list of agent harnesses, which gets a 404)
        self.requests: list[tuple[str, str, str | None]] = []
        self.others: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}  # file name -> bytes sent before the connection drops, once
        self._etags: dict[Path, str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def add(self, repo_id: str, folder: Path, **options) -> Repo:
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        if "config" not in options and (folder / "config.json").is_file():
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            options["config"] = {"model_type": model_type}
        self.repos[repo_id] = Repo(folder, sha, **options)
        return self.repos[repo_id]

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of file `name` (None: the whole file)."""
        return [
            r for method, path, r in self.requests if method == "GET" and path.endswith("/" + name)
        ]

    def etag(self, path: Path) -> str:
        if path not in self._etags:
            self._etags[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._etags[path]

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a dropped one is unambiguous

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._route(body=False)

        def do_GET(self):
            self._route(body=True)

        def _route(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            log = hub.requests if info or resolve else hub.others
            log.append((self.command, path, self.headers.get("Range")))
            if info:
                self._model_info(info[1], info[2] or "main")
            elif resolve:
                self._file(resolve[1], resolve[2], resolve[3], body)
            else:
                self._error(404, "NotFound", "no such endpoint")

        def _error(self, status: int, code: str, message: str, commit: str | None = None):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            data = json.dumps({"error": message}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _repo(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif not repo.knows(revision):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            else:
                return repo
            return None

        def _model_info(self, repo_id: str, revision: str):
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            siblings = []
            for name, path in repo.files().items():
                size = path.stat().st_size
                sibling = {"rfilename": name, "size": size, "blobId": hub.etag(path)[:40]}
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": size, "sha256": hub.etag(path), "pointerSize": 134}
                siblings.append(sibling)
            answer = {
                "id": repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "siblings": siblings,
                **({"config": repo.config} if repo.config else {}),
                **({"gguf": repo.gguf} if repo.gguf else {}),
            }
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _file(self, repo_id: str, revision: str, name: str, body: bool):
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if repo.gated:
                self._error(403, "GatedRepo", "Access to model is restricted")
                return
            path = repo.files().get(name)
            if path is None:
                self._error(404, "EntryNotFound", "Entry not found", commit=repo.sha)
                return
            size = path.stat().st_size
            start = 0
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if wanted and body:
                start = int(wanted[1])
                if start >= size:
                    self._error(416, "RangeNotSatisfiable", "Range not satisfiable")
                    return
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{hub.etag(path)}"')
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if not body:
                return
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            if name in hub.cut:  # promise the whole file, send part of it, hang up
                self.wfile.write(data[: hub.cut.pop(name)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

    return Handler
