"""A stand-in for llama-cpp-python with the few Llama methods app/llama_worker.py uses, for
tests/test_bench_compare.py (put on the worker's PYTHONPATH in place of a real build).

Time is virtual: importing this replaces time.perf_counter with a clock that only eval advances,
by EVAL_S per call plus TOKEN_S per token, so the worker's rates are exact. Every call is
appended as a JSON line to $FAKE_LLAMA_LOG; $FAKE_LLAMA_CRASH=1 kills the process with SIGSEGV
on a prompt of more than one token, as llama.cpp's AMX kernels did on a VM."""

import json
import os
import signal
import time

EVAL_S = 0.004
TOKEN_S = 0.001
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8
_now = [1000.0]
time.perf_counter = lambda: _now[0]


def _log(**entry):
    path = os.environ.get("FAKE_LLAMA_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class Llama:
    def __init__(self, model_path, **kwargs):
        if not os.path.isfile(model_path):
            raise ValueError(f"Failed to load model from file: {model_path}")
        _log(call="init", model_path=model_path, **kwargs)
        self.n_tokens = 0
        self.metadata = {"general.file_type": "15"}
        _now[0] += 0.5  # the load

    def n_vocab(self):
        return 1000

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        tokens = list(tokens)
        if len(tokens) > 1 and os.environ.get("FAKE_LLAMA_CRASH"):
            os.kill(os.getpid(), signal.SIGSEGV)
        _log(call="eval", tokens=tokens, n_past=self.n_tokens)
        _now[0] += EVAL_S + TOKEN_S * len(tokens)
        self.n_tokens += len(tokens)

    def sample(self, temp=0.8, **kwargs):
        assert temp == 0.0, "the worker samples greedily"
        return (self.n_tokens * 7) % 1000
