"""Shared fixtures: seeded tiny random models of every architecture (HF is their oracle), the real
default model, and a guard that keeps the suite off the network."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import sys
import tempfile

import pytest

# Before anything computes a path or asks a hub: a private cache and data dir, and no network.
os.environ["XDG_CACHE_HOME"] = os.environ.get("XQCHAT_TEST_CACHE") or tempfile.mkdtemp(
    prefix="xqchat-cache-"
)
# Chats and settings never land in the user's own dirs (TUI tests point these at tmp_path).
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="xqchat-data-")
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="xqchat-config-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

# Off a GPU, Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen before
# any kernel is defined (tests/test_kernels.py compiles them for real GPUs in a subprocess).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("localhost", "::1") and not host.startswith("127."):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"the test suite must not reach the network (tried {host})")
    return _connect(self, address)


socket.socket.connect = _loopback_only

TINY = dict(
    vocab_size=49152,  # the default model's tokenizer, so tiny models also run through the CLI
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

WIDE = {**TINY, "hidden_size": 128, "num_attention_heads": 8}


def assert_metal_contract(path, kernel, reference, *args):
    """Trace a Metal kernel without running it (mx.export_function; no Metal here) and check that
    its declared output has the shape and dtype of its reference's on the same inputs."""
    import mlx.core as mx

    traced = {}

    def call(*args):
        out = kernel(*args)
        traced["shape"], traced["dtype"] = out.shape, out.dtype
        return out

    mx.export_function(str(path), call, *args)
    expected = reference(*args)
    assert (traced["shape"], traced["dtype"]) == (expected.shape, expected.dtype)
    assert path.stat().st_size > 0
    return expected


def load_tiny(tiny_models, name, backend, **options):
    """One of the tiny models (see tiny_configs), in fp32."""
    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.models import resolve

    return load_model(
        resolve(str(tiny_models[name])), EngineOptions(backend=backend, weights="fp32", **options)
    )


def longrope(rotary_dim: int) -> dict:
    """Phi-3's LongRoPE with distinct short and long factors (long past the original 128)."""
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.25 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],
        "original_max_position_embeddings": 128,
    }


def tiny_configs():
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )

    return {
        "llama": LlamaConfig(
            **TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        ),
        "llama3": LlamaConfig(
            **TINY,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "mha": LlamaConfig(**{**TINY, "num_key_value_heads": 4}, tie_word_embeddings=True),
        "mistral": MistralConfig(**TINY, sliding_window=None),
        "qwen2": Qwen2Config(**TINY, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
        # K and V together narrower than X (32 + 32 < 128): XQuant caches SVD latents, not X
        "gqa-qwen2": Qwen2Config(**WIDE, tie_word_embeddings=True),
        "gqa-qwen3": Qwen3Config(**WIDE, head_dim=16, tie_word_embeddings=True),
        "smollm3": SmolLM3Config(
            **TINY, no_rope_layers=[1, 0], pad_token_id=0
        ),  # layer 1 without RoPE
        "phi3": Phi3Config(
            **TINY, original_max_position_embeddings=128, rope_parameters=longrope(16)
        ),
        # Phi-4-mini: 3/4 of each head rotates (here 1/2: 8 of 16 dims)
        "phi4": Phi3Config(
            **TINY,
            original_max_position_embeddings=128,
            partial_rotary_factor=0.5,
            rope_parameters={**longrope(8), "partial_rotary_factor": 0.5},
            tie_word_embeddings=True,
        ),
        "mistral-window": MistralConfig(**TINY, sliding_window=16),
        # a sliding layer (window 16, base 10^4) and a global one (base 10^6, linear scaling)
        "gemma3": Gemma3TextConfig(
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=30.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            },
        ),
    }


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """The user's data and config dirs (chat store, settings) under tmp_path."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


@pytest.fixture(scope="session")
def default_files():
    from xqchat.models import resolve

    return resolve("default")


@pytest.fixture(scope="session")
def default_tokenizer(default_files):
    from xqchat.models.tokenizer import load_tokenizer

    return load_tokenizer(default_files)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_tokenizer):
    """name -> directory with config.json, model.safetensors and the default tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, (name, config) in enumerate(tiny_configs().items()):
        out[name] = write_tiny(config, root / name, i, default_tokenizer)
    return out


def write_tiny(config, path, seed: int, tokenizer):
    """A seeded random transformers model of `config` saved with the default tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Gemma's norms scale by 1 + w: their weights center on 0, the others' on 1
    norm_center = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():  # HF's init leaves biases at 0 and norms at 1: make every weight count
        for pname, p in model.named_parameters():
            p.copy_(
                norm_center + 0.1 * torch.randn_like(p)
                if "norm" in pname
                else 0.08 * torch.randn_like(p)
            )
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path)
    return path


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake hub; huggingface_hub pointed at it (it reads these settings at import time,
    so the module constants are patched) with an empty cache; the network otherwise allowed."""
    from hub_server import CHUNK, FakeHub
    from huggingface_hub import constants

    server = FakeHub().start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    yield server
    server.stop()


@pytest.fixture
def qwen2_repo(tmp_path, tiny_models):
    """The tiny qwen2 model as a hub repo, plus files a pull must leave alone."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "README.md").write_text("# tiny")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"onnx")
    return folder


BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx") else [])


def pytest_collection_modifyitems(config, items):
    """`metal` tests run only on Apple Silicon, `cuda` tests only with an NVIDIA GPU."""
    metal = (
        importlib.util.find_spec("mlx") is not None
        and __import__("mlx.core").core.metal.is_available()
    )
    cuda = torch.cuda.is_available()
    for item in items:
        if "metal" in item.keywords and not metal:
            item.add_marker(pytest.mark.skip(reason="needs Apple Silicon (Metal)"))
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    """Every backend this machine has: the conformance tests hold each to the same expectations."""
    return request.param


@pytest.fixture(scope="session")
def default_fp32(backend, default_files):
    from xqchat.backends.base import EngineOptions, load_model

    return load_model(default_files, EngineOptions(backend=backend, weights="fp32"))


@pytest.fixture(scope="session")
def hf_default(default_files):
    """transformers' own GGUF loader: an oracle independent of our GGUF reader."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        default_files.path.parent, gguf_file=default_files.path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def mt_bench_prompts():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench_questions.jsonl"
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]


def cli(capsys, *args, stdin=None, monkeypatch=None):
    """Run the xqchat command line in-process: (exit code, stdout, stderr)."""
    from xqchat.app.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
