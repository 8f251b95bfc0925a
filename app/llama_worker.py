"""The llama.cpp side of `xqchat bench speed --compare llama.cpp`, run as its own process
(app/llama_bench.py starts it with a llama-cpp-python build folder first on PYTHONPATH), so
llama.cpp's threads and memory stay out of ours and its peak RSS is its own.

It imports nothing of xqchat: the standard library and llama_cpp only. Requests come one JSON
object a line on stdin, each answered by one JSON line on the protocol channel (the process's
original stdout; file descriptor 1 is pointed at stderr, so anything llama.cpp prints there
cannot corrupt the answers):

  {"op": "load", "model": PATH, "n_ctx": N, "n_threads": N, "kv": "f16" | "q8_0"}
      -> {"ok": true, "load_s": s, "n_vocab": N, "file_type": the GGUF's general.file_type,
          "flash_attn": bool, "peak_rss_bytes": B}
  {"op": "speed", "prompts": [[token ids], ...], "new_tokens": N}
      -> {"ok": true, "prefill_tok_s", "decode_tok_s", "prompt_tokens", "prefill_s", "decode_s",
          "tokens": the first prompt's new tokens, "peak_rss_bytes": B}
  {"op": "quit"} (or end of input) -> the process exits
A request that fails is answered {"ok": false, "error": "..."}.

Timing is ours (app/bench.py `speed`): prefill = prompt tokens / the time from the prompt to the
first new token; decode = (new tokens - 1) / the time after the first; totals over all prompts.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started. On Linux, VmHWM of /proc/self/status: ru_maxrss
    keeps the RSS the parent had when it forked this process (exec carries it over), which with
    the parent's model loaded is the parent's peak, not llama.cpp's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class Worker:
    def __init__(self) -> None:
        self.llm = None
        self.flash_attn = False

    def load(self, model: str, n_ctx: int, n_threads: int, kv: str) -> dict:
        import llama_cpp

        kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv]
        self.flash_attn = kv != "f16"  # llama.cpp quantizes the V cache only with flash attention
        start = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=model,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            flash_attn=self.flash_attn,
            type_k=kv_type,
            type_v=kv_type,
            verbose=False,
        )
        load_s = time.perf_counter() - start
        file_type = self.llm.metadata.get("general.file_type")
        return {
            "load_s": load_s,
            "n_vocab": self.llm.n_vocab(),
            "file_type": None if file_type is None else int(file_type),
            "flash_attn": self.flash_attn,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def speed(self, prompts: list[list[int]], new_tokens: int) -> dict:
        llm = self.llm
        if llm is None:
            raise RuntimeError("no model loaded")
        prefill_tokens = decode_tokens = 0
        prefill_s = decode_s = 0.0
        first_tokens: list[int] = []
        for i, ids in enumerate(prompts):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            token = llm.sample(temp=0.0)
            first = time.perf_counter()
            tokens = [token]
            for _ in range(new_tokens - 1):
                llm.eval([token])
                token = llm.sample(temp=0.0)
                tokens.append(token)
            end = time.perf_counter()
            prefill_tokens += len(ids)
            prefill_s += first - start
            decode_tokens += new_tokens - 1
            decode_s += end - first
            if i == 0:
                first_tokens = [int(t) for t in tokens]
        return {
            "prefill_tok_s": prefill_tokens / prefill_s if prefill_s else 0.0,
            "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
            "prompt_tokens": prefill_tokens,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "tokens": first_tokens,
            "peak_rss_bytes": peak_rss_bytes(),
        }


def serve(requests, answer) -> None:
    worker = Worker()
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop("op")
            if op == "quit":
                return
            if op not in ("load", "speed"):
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **getattr(worker, op)(**request)}
        except Exception as e:  # answered, so the parent can say what went wrong
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answer(reply)


def main() -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (Python's or the C library's) go to stderr
    sys.stdout = sys.stderr

    def answer(reply: dict) -> None:
        channel.write(json.dumps(reply) + "\n")
        channel.flush()

    serve(sys.stdin, answer)


if __name__ == "__main__":
    main()
