"""llama.cpp as the baseline of `xqchat bench speed --compare llama.cpp`: llama-cpp-python, from
a build folder that packaging/install_llama_cpp.sh made for one CPU level, runs the same GGUF file
on the same prompt token ids in a worker process (app/llama_worker.py) that answers JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from xqchat.models.errors import XQError

LEVELS = ("avx2", "avx512", "native")
KV_TYPES = ("f16", "q8_0")
WORKER = Path(__file__).with_name("llama_worker.py")
CHECKOUT = Path(__file__).resolve().parents[1]  # the source checkout, in an editable install


def default_level() -> str:
    """The build for this CPU: AVX-512 where it has it, else AVX2."""
    from xqchat.backends import hardware

    return "avx512" if hardware.cpu().level.startswith("avx512") else "avx2"


def bench_dirs() -> list[Path]:
    """Where builds are looked for, in order: $XQCHAT_BENCH_DIR, ./.bench, the checkout's .bench."""
    dirs = [Path(os.environ["XQCHAT_BENCH_DIR"])] if os.environ.get("XQCHAT_BENCH_DIR") else []
    dirs += [Path.cwd() / ".bench", CHECKOUT / ".bench"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def find_build(level: str) -> Path:
    """The llama-cpp-python build folder for `level`, or a one-line refusal saying how to make it."""
    folders = [d / f"llama-cpp-{level}" for d in bench_dirs()]
    for folder in folders:
        if (folder / "llama_cpp" / "__init__.py").is_file():
            return folder
    raise XQError(
        f"--compare llama.cpp needs llama-cpp-python built for {level}, found in none of "
        f"{', '.join(map(str, folders))}: run packaging/install_llama_cpp.sh {level}"
    )


def file_type_name(code: int | None) -> str:
    """A GGUF's general.file_type as llama.cpp's quantize names it (15 -> Q4_K_M)."""
    import gguf

    try:
        return gguf.LlamaFileType(int(code)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "unknown"


def context_for(prompts: list[list[int]], new_tokens: int) -> int:
    """llama.cpp's n_ctx: the longest prompt and its new tokens, rounded up to 256."""
    need = max(len(ids) for ids in prompts) + new_tokens
    return -(-need // 256) * 256


class LlamaCpp:
    """One worker process with the model loaded; `speed` times it, `close` ends it."""

    def __init__(
        self, build: Path, model: Path, n_ctx: int, n_threads: int, kv: str = "f16"
    ) -> None:
        self.build, self.n_ctx, self.n_threads, self.kv = build, n_ctx, n_threads, kv
        path = os.pathsep.join(p for p in (str(build), os.environ.get("PYTHONPATH")) if p)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONPATH": path},
            text=True,
        )
        try:
            self.loaded = self._request(
                "load", model=str(model), n_ctx=n_ctx, n_threads=n_threads, kv=kv
            )
        except BaseException:
            self.close()
            raise

    def _request(self, op: str, **args) -> dict:
        process = self._process
        try:
            process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = process.wait()
            raise XQError(f"llama.cpp's worker {self._death(code)} during {op}{self._last_words()}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise XQError(f"llama.cpp failed during {op}: {reply['error']}")
        return reply

    @staticmethod
    def _death(code: int) -> str:
        if code < 0:
            import signal

            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def _last_words(self) -> str:
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        return f" (its last output: {lines[-1]})" if lines else ""

    def speed(self, prompts: list[list[int]], new_tokens: int) -> dict:
        return self._request("speed", prompts=prompts, new_tokens=new_tokens)

    def close(self) -> None:
        process = self._process
        if process.poll() is None:
            try:
                process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                process.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
