"""The memory planner (`xqchat show MODEL --fit SIZE`): its byte formulas against what the engines
really hold, for every cache kind across its exact windows and flushed blocks, and the table."""

import json

import pytest
from conftest import cli

from xqchat.backends import planner
from xqchat.backends.base import CacheSpec, EngineOptions, load_model
from xqchat.models import resolve


@pytest.mark.parametrize("arch", ["gqa-qwen2", "qwen2"])  # SVD latents, and X itself
@pytest.mark.parametrize("cache", planner.CACHES, ids=lambda c: f"{c.kind}-{c.bits}")
def test_cache_bytes_equal_what_the_caches_hold(tiny_models, backend, arch, cache):
    model = load_model(resolve(str(tiny_models[arch])), EngineOptions(backend=backend))
    exact_bytes = 2 if backend == "torch" else 4  # bf16 rows on the CPU; MLX's CPU: float32
    cache = CacheSpec(cache.kind, bits=cache.bits, group=32, residual=16, sink=4)
    session = model.new_session(cache)
    held = 0
    for piece in (3, 30, 1, 60, 1, 1, 90):  # through the sink, the window and several flushes
        session.prefill(list(range(500 + held, 500 + held + piece)))
        held += piece
        got = session.memory().cache_bytes
        assert got == planner.cache_bytes(model.spec, cache, held, exact_bytes), held


def test_a_window_layers_kv_bytes_stop_at_its_window(tiny_models, backend):
    model = load_model(resolve(str(tiny_models["gemma3"])), EngineOptions(backend=backend))
    exact_bytes = 2 if backend == "torch" else 4
    session, held = model.new_session(), 0
    for piece in (3, 30, 1, 1):  # the window (16) fills, then decode steps
        session.prefill(list(range(500 + held, 500 + held + piece)))
        held += piece
        got = session.memory().cache_bytes
        assert got == planner.cache_bytes(model.spec, CacheSpec(), held, exact_bytes), held
    assert got == (16 + held) * 2 * model.spec.kv_dim * exact_bytes


@pytest.mark.parametrize("weights", planner.WEIGHTS)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])  # tied, untied, Gemma's norms
def test_weight_bytes_equal_what_the_engine_holds(tiny_models, arch, weights):
    files = resolve(str(tiny_models[arch]))
    model = load_model(files, EngineOptions(backend="torch", weights=weights, int8_threshold=6))
    assert model.weight_bytes() == planner.weight_bytes(model.spec, weights)


def test_longest_chat_is_the_most_tokens_that_fit(default_files):
    spec = load_model(default_files, EngineOptions()).spec
    cache = CacheSpec("xquant-cl", bits=3)
    memory = planner.RUNTIME_BYTES + planner.weight_bytes(spec, "q4") + 40 * 2**20
    tokens = planner.longest_chat(spec, "q4", cache, memory)
    room = memory - planner.RUNTIME_BYTES - planner.weight_bytes(spec, "q4")
    room -= planner.factor_bytes(spec, cache)
    assert 0 < tokens < spec.max_context
    assert planner.cache_bytes(spec, cache, tokens) <= room
    assert planner.cache_bytes(spec, cache, tokens + 1) > room
    assert planner.longest_chat(spec, "bf16", cache, 2**20) == 0  # not even the weights


def test_show_fit_prints_the_table(capsys):
    code, out, _ = cli(capsys, "show", "default", "--fit", "1GB", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["memory_bytes"] == 2**30
    assert len(plan["plan"]) == len(planner.WEIGHTS) * len(planner.CACHES)
    by_choice = {(r["weights"], r["cache"]): r["tokens"] for r in plan["plan"]}
    assert by_choice["q4", "xquant-cl 2-bit"] >= by_choice["bf16", "kv"]
    code, out, _ = cli(capsys, "show", "default", "--fit", "1GB")
    assert "longest chat" in out and "q4" in out
    code, _, err = cli(capsys, "show", "default", "--fit", "lots")
    assert code == 2 and "is not a size such as 16GB" in err


def test_the_app_plans_with_what_the_planner_knows(default_files, monkeypatch):
    """The status bar's and settings' figure: longest_chat for bf16/int8/q8/q4 in a known memory;
    none for fp32/fp16 weights or where the OS does not say its memory."""
    from xqchat.app.tui.settings_screen import plan_line
    from xqchat.models.weights import open_checkpoint

    spec = open_checkpoint(default_files).spec
    cache = CacheSpec("xquant-cl", bits=3)
    assert planner.fits(spec, "q4", cache, 2**30) == planner.longest_chat(spec, "q4", cache, 2**30)
    assert planner.fits(spec, "fp32", cache, 2**30) is None
    assert planner.fits(spec, "q4", cache, 0) is None
    assert planner.machine_memory() > 2**30  # this machine's, from sysconf
    monkeypatch.setattr(planner, "machine_memory", lambda: 5 * 2**29)  # 2.5 GiB
    assert plan_line("default", "q4", "xquant-cl", 3) == (
        "Memory plan: this machine's 2.5 GiB hold its whole context (q4 weights, xquant-cl 3-bit "
        "cache)"
    )
    tight = planner.RUNTIME_BYTES + planner.weight_bytes(spec, "bf16") + 2**20
    monkeypatch.setattr(planner, "machine_memory", lambda: tight)
    tokens = planner.longest_chat(spec, "bf16", CacheSpec("kv"), tight)
    assert 0 < tokens < spec.max_context
    assert f"hold a chat of {tokens:,} tokens (bf16 weights, kv cache)" in plan_line(
        "default", "bf16", "kv", 4
    )
    assert "--fit" in plan_line("default", "fp32", "kv", 4)
