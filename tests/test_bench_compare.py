"""`xqchat bench speed --compare llama.cpp` without llama.cpp: its refusals, and the parent/worker
plumbing against tests/fake_llama (a stand-in llama_cpp whose clock only its eval advances)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from conftest import cli

from xqchat.app import bench_cli, llama_bench
from xqchat.app.bench import peak_rss_bytes
from xqchat.models.errors import XQError

FAKE = Path(__file__).with_name("fake_llama")
EVAL_S, TOKEN_S = 0.004, 0.001  # tests/fake_llama's costs


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """tests/fake_llama as the avx2 build; its calls logged to the returned file."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "llama-cpp-avx2").symlink_to(FAKE)
    monkeypatch.setattr(llama_bench, "bench_dirs", lambda: [tmp_path / "bench"])
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_refuses_a_model_that_is_not_gguf(capsys, tiny_models, fake_build):
    code, _, err = cli(
        capsys, "bench", "speed", "-m", str(tiny_models["llama"]), "--compare", "llama.cpp"
    )
    assert code == 1
    assert "--compare llama.cpp needs a GGUF model" in err and "is safetensors" in err
    assert not fake_build.exists()  # refused before anything ran


def test_refuses_without_a_build(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_bench, "bench_dirs", lambda: [tmp_path])
    code, _, err = cli(capsys, "bench", "speed", "--compare", "llama.cpp", "--llama-cpp", "avx512")
    assert code == 1
    assert err.count("\n") == 1 and "run packaging/install_llama_cpp.sh avx512" in err
    assert str(tmp_path / "llama-cpp-avx512") in err


def test_llama_options_need_the_llama_compare(capsys):
    code, _, err = cli(capsys, "bench", "speed", "--llama-kv", "q8_0")
    assert code == 2 and "--llama-kv applies to --compare llama.cpp only" in err


def test_default_level_follows_the_cpu(monkeypatch):
    from xqchat.backends import hardware

    level = hardware.cpu().level
    assert llama_bench.default_level() == ("avx512" if level.startswith("avx512") else "avx2")


def test_worker_times_the_prompt_then_each_new_token(tmp_path, fake_build):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    with llama_bench.LlamaCpp(
        llama_bench.find_build("avx2"), model, n_ctx=512, n_threads=3, kv="q8_0"
    ) as llama:
        assert llama.loaded["load_s"] == pytest.approx(0.5)
        assert llama.loaded["file_type"] == 15 and llama.loaded["flash_attn"] is True
        assert llama_bench.file_type_name(llama.loaded["file_type"]) == "Q4_K_M"
        timed = llama.speed(prompts, 4)
        again = llama.speed(prompts, 4)
    # prefill: prompt tokens / (one eval of each prompt); decode: (4 - 1) one-token evals each
    assert timed["prefill_tok_s"] == pytest.approx(8 / (2 * EVAL_S + 8 * TOKEN_S))
    assert timed["decode_tok_s"] == pytest.approx(1 / (EVAL_S + TOKEN_S))
    assert timed["prompt_tokens"] == 8 and timed["peak_rss_bytes"] > 0
    if sys.platform == "linux":  # its own peak, not the RSS this process had when it forked it
        assert timed["peak_rss_bytes"] < peak_rss_bytes() / 2
    assert timed["tokens"] == again["tokens"] and len(timed["tokens"]) == 4
    init, *evals = calls(fake_build)
    assert init["call"] == "init" and init["model_path"] == str(model)
    assert (init["n_ctx"], init["n_threads"], init["n_threads_batch"]) == (512, 3, 3)
    assert init["flash_attn"] is True and init["type_k"] == init["type_v"] == 8
    assert init["verbose"] is False
    # each prompt from an empty cache, as given (token ids, not text), then one token at a time
    new = timed["tokens"]
    first = [(e["tokens"], e["n_past"]) for e in evals[:4]]
    assert first == [([1, 2, 3], 0), ([new[0]], 3), ([new[1]], 4), ([new[2]], 5)]
    assert (evals[4]["tokens"], evals[4]["n_past"]) == ([4, 5, 6, 7, 8], 0)
    assert len(evals) == 2 * 2 * 4


def test_f16_cache_leaves_flash_attention_off(tmp_path, fake_build):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with llama_bench.LlamaCpp(FAKE, model, n_ctx=256, n_threads=2) as llama:
        assert llama.loaded["flash_attn"] is False
    (init,) = calls(fake_build)
    assert init["flash_attn"] is False and init["type_k"] == init["type_v"] == 1


def test_worker_errors_and_crashes_are_one_clear_line(tmp_path, fake_build, monkeypatch):
    with pytest.raises(XQError, match="llama.cpp failed during load: ValueError: Failed to load"):
        llama_bench.LlamaCpp(FAKE, tmp_path / "missing.gguf", n_ctx=256, n_threads=2)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    with llama_bench.LlamaCpp(FAKE, model, n_ctx=256, n_threads=2) as llama:
        with pytest.raises(XQError, match="worker was killed by SIGSEGV during speed"):
            llama.speed([[1, 2]], 2)


def test_context_for_holds_the_longest_prompt_and_new_tokens():
    assert llama_bench.context_for([[1] * 10, [1] * 300], 32) == 512
    assert llama_bench.context_for([[1] * 224], 32) == 256


class FakeTokenizer:
    def render(self, messages):
        return list(range(1, 6 + len(messages[0]["content"]) % 5))


class FakeEngine:
    backend, device, dtype, paths, drafter, speculation = "torch", "cpu", "q4", {}, None, None

    def weight_bytes(self):
        return 123


def test_compare_alternates_and_reports_medians(capsys, monkeypatch, fake_build):
    def load_engine(files, opts):
        return files, FakeTokenizer(), FakeEngine()

    ours = iter([10.0, 30.0, 20.0])

    def speed(engine, rendered, new_tokens, progress):
        with open(fake_build, "a") as f:
            f.write(json.dumps({"call": "ours", "prompts": rendered}) + "\n")
        decode = next(ours)
        return {"decode_tok_s": decode, "prefill_tok_s": 10 * decode, "cache_bytes": 1}

    monkeypatch.setattr(bench_cli, "load_engine", load_engine)
    monkeypatch.setattr(bench_cli.benchmarks, "speed", speed)
    code, out, err = cli(
        capsys,
        "bench",
        "speed",
        "--compare",
        "llama.cpp",
        "--llama-cpp",
        "avx2",
        "--rounds",
        "3",
        "--new-tokens",
        "3",
        "--json",
    )
    assert code == 0, err
    stats = json.loads(out)
    log = calls(fake_build)
    # llama.cpp loads once; then ours and llama.cpp's prompt take turns, three rounds
    prompts_run = [e["call"] for e in log if e["call"] == "ours" or len(e.get("tokens", [])) > 1]
    assert [e["call"] for e in log].count("init") == 1
    assert prompts_run == ["ours", "eval"] * 3
    prompt = log[1]["prompts"][0]
    assert [e["tokens"] for e in log if e["call"] == "eval"][0] == prompt  # the same ids
    assert log[0]["n_threads"] == bench_cli.engine_threads()
    assert stats["decode_tok_s"] == 20.0 and stats["prefill_tok_s"] == 200.0
    assert [r["decode_tok_s"] for r in stats["runs"]] == [10.0, 30.0, 20.0]
    (llama,) = stats["baselines"]
    assert llama["name"] == "llama.cpp" and llama["weights"] == "Q4_K_M"
    decode = 1 / (EVAL_S + TOKEN_S)
    prefill = len(prompt) / (EVAL_S + TOKEN_S * len(prompt))
    assert llama["decode_tok_s"] == pytest.approx(decode)
    assert llama["prefill_tok_s"] == pytest.approx(prefill)
    assert llama["decode_speedup"] == pytest.approx(20.0 / decode)
    assert llama["prefill_speedup"] == pytest.approx(200.0 / prefill)
    assert len(llama["runs"]) == 3
    assert statistics.median(r["decode_tok_s"] for r in llama["runs"]) == llama["decode_tok_s"]
    assert llama["peak_rss_bytes"] > 0 and llama["load_s"] == pytest.approx(0.5)
    assert (llama["kv_cache"], llama["flash_attn"], llama["build"]) == (
        "f16",
        False,
        "llama-cpp-avx2",
    )
    assert llama["n_ctx"] >= len(prompt) + 3
