"""The command line: every bad input gives one clear line and a non-zero exit; JSON contracts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli

from xqchat.backends import hardware

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def one_line_error(err: str, fragment: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xqchat: error: ") and fragment in lines[0], lines[0]


@pytest.fixture
def broken_models(tmp_path, tiny_models, default_files):
    cut = tmp_path / "truncated"
    cut.mkdir()
    for f in tiny_models["llama"].iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    gguf = tmp_path / "corrupt.gguf"
    gguf.write_bytes(default_files.path.read_bytes()[:5_000_000])
    arch = tmp_path / "gpt2"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (arch / "model.safetensors").write_bytes(
        (tiny_models["llama"] / "model.safetensors").read_bytes()
    )
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return dict(truncated=cut, gguf=gguf, arch=arch, pickled=pickled)


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("/nowhere/model.gguf", "no such file or directory: /nowhere/model.gguf"),
        ("@truncated", "is truncated or not a safetensors file"),
        ("@gguf", "corrupt.gguf is truncated or not a valid GGUF file"),
        ("@arch", "unsupported architecture 'gpt2'"),
        ("@pickled", "holds only pickle weights (pytorch_model.bin)"),
    ],
)
def test_bad_models(capsys, broken_models, backend, model, fragment):
    if model.startswith("@"):
        model = str(broken_models[model[1:]])
    code, out, err = cli(capsys, "run", "--backend", backend, "-m", model, "hello")
    assert code == 1 and out == ""
    one_line_error(err, fragment)


def test_empty_prompt(capsys, monkeypatch):
    code, _, err = cli(capsys, "run", "  ")
    assert code == 1
    one_line_error(err, "the prompt is empty")
    code, _, err = cli(capsys, "run", "-", stdin="\n", monkeypatch=monkeypatch)
    assert code == 1
    one_line_error(err, "the prompt is empty")


def test_max_tokens_zero(capsys):
    code, _, err = cli(capsys, "run", "--max-tokens", "0", "hi")
    assert code == 2
    one_line_error(err, "Invalid value for '--max-tokens': 0 is not in the range x>=1")


def test_prompt_longer_than_context(capsys, tiny_models, backend):
    code, out, err = cli(
        capsys, "run", "--backend", backend, "-m", str(tiny_models["llama"]), "word " * 400
    )
    assert code == 1 and out == ""
    one_line_error(err, "the prompt is 4")
    assert "the model's context holds 256" in err


@pytest.fixture
def opened(monkeypatch):
    """What the chat app would have been opened with."""
    calls = []
    monkeypatch.setattr("xqchat.app.tui.app.run", lambda overrides=None: calls.append(overrides))
    return calls


def test_bare_command_and_chat_open_the_app(capsys, opened):
    assert cli(capsys)[0] == 0
    assert cli(capsys, "chat")[0] == 0
    assert cli(capsys, "chat", "--cache", "kv-quant", "--bits", "4", "-m", "default")[0] == 0
    assert cli(capsys, "chat", "--overflow", "sink-window", "--temperature", "0.5")[0] == 0
    assert cli(capsys, "chat", "--cache-sink", "0")[0] == 0
    assert opened == [
        None,
        {},
        {"cache": "kv-quant", "bits": 4, "model": "default"},
        {"overflow": "sink-window", "temperature": 0.5},
        {"cache_sink": 0},
    ]
    from xqchat.app.tui.settings import Settings

    # the cache's exact first tokens, not the sink-window policy's kept tokens
    settings = Settings(**opened[-1])
    assert settings.engine_options().cache.sink == 0 and settings.sink == Settings.sink


def test_chat_refuses_bad_options(capsys, opened):
    code, _, err = cli(capsys, "chat", "--bits", "5")
    assert code == 2 and opened == []
    one_line_error(err, "Invalid value for '--bits'")
    code, out, _ = cli(capsys, "chat", "--help")
    assert code == 0 and "xqchat chat --cache kv-quant --bits 4" in out


def test_run_json_fields(capsys, tiny_models, backend):
    code, out, err = cli(
        capsys,
        "run",
        "--backend",
        backend,
        "-m",
        str(tiny_models["llama"]),
        "--json",
        "--weights",
        "bf16",
        "--max-tokens",
        "5",
        "Hi",
    )
    assert code == 0, err
    stats = json.loads(out)
    assert set(stats) >= {
        "text",
        "prompt_tokens",
        "new_tokens",
        "decode_tok_s",
        "prefill_tok_s",
        "cache_bytes",
        "fp16_kv_bytes",
        "accepted_per_step",
    }
    # --drafter auto, and no drafter for this model: lookup's beam alone
    assert stats["new_tokens"] <= 5 and stats["accepted_per_step"] >= 1
    held = stats["prompt_tokens"] + stats["new_tokens"] - 1
    assert stats["fp16_kv_bytes"] == held * 2 * 2 * 32 * 2  # layers * (K,V) * kv_dim * 2 bytes
    assert stats["cache_bytes"] == stats["fp16_kv_bytes"]  # bf16 weights -> bf16 K/V


def test_run_streams_text_from_stdin(capsys, monkeypatch, tiny_models):
    code, out, _ = cli(
        capsys,
        "run",
        "-m",
        str(tiny_models["qwen3"]),
        "--max-tokens",
        "4",
        "-",
        stdin="Hello there",
        monkeypatch=monkeypatch,
    )
    assert code == 0 and out.endswith("\n") and len(out) > 1


def test_bench_speed_json(capsys, tiny_models, backend):
    code, out, err = cli(
        capsys,
        "bench",
        "speed",
        "--backend",
        backend,
        "-m",
        str(tiny_models["mistral"]),
        "--json",
        "--prompts",
        str(DATA / "mt_bench_questions.jsonl"),
        "--limit",
        "2",
        "--new-tokens",
        "6",
        "--context",
        "40",
        "--profile",
    )
    assert code == 0, err
    stats = json.loads(out)
    assert set(stats) >= {
        "decode_tok_s",
        "prefill_tok_s",
        "accepted_per_step",
        "cache_bytes",
        "peak_rss_bytes",
        "backend",
        "device",
    }
    assert stats["prompts"] == 2 and stats["backend"] == backend and stats["device"] == "cpu"
    assert stats["decode_tok_s"] > 0 and stats["prefill_tok_s"] > 0 and stats["peak_rss_bytes"] > 0
    phases = [stats[f"peak_rss_{phase}_bytes"] for phase in ("load", "prefill", "decode")]
    if sys.platform.startswith("linux"):  # the peak resets per phase there
        assert all(0 < peak <= stats["peak_rss_bytes"] for peak in phases)
        assert stats["weight_bytes"] + stats["cache_bytes"] < max(phases)
    profile = stats["profile"]
    assert 0 < profile["matmul_ms"] and 0 <= profile["outside_matmul_share"] < 1
    ops = {op["op"] for op in profile["top_ops"]}
    if backend == "mlx":
        assert {op.split(" (")[0] for op in ops} >= {"layer products", "LM head"}
        return
    # the decode products took the path measured fastest on this CPU, and the profile saw it
    paths = stats["paths"]
    assert paths["device"] == "cpu" and paths["cpu"] == hardware.cpu().level
    expected = {
        "onednn-packed": {"mkldnn::_linear_pointwise"},
        "c-pass": {"xqchat::bf16_linear"},
        "torch": {"aten::mm", "aten::addmm"},
    }[paths["bf16_decode"]]
    assert expected & ops


def test_show_hardware_names_the_cpu_and_its_paths(capsys):
    code, out, _ = cli(capsys, "show", "--hardware", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["cpu"]["level"] == hardware.cpu().level and report["backend"] == "torch"
    paths = report["cpu_paths"]
    assert paths["bf16_decode"] in ("onednn-packed", "c-pass", "torch")
    assert paths["int8_many_rows"] in ("torch._int_mm", "float32")
    if not paths["int_mm_exact"]:  # never a product that saturates
        assert paths["int8_many_rows"] == "float32"
    code, out, _ = cli(capsys, "show", "--hardware")
    assert code == 0 and "bf16 decode" in out and hardware.cpu().level in out
    code, _, err = cli(capsys, "show", "default", "--hardware")
    assert code == 2 and "--hardware takes no MODEL" in err


def test_bench_speed_rejects_bad_prompts_file(capsys, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"question": "no turns"}\n')
    code, _, err = cli(capsys, "bench", "speed", "--prompts", str(bad))
    assert code == 1
    one_line_error(err, "p.jsonl:2: expected a JSON object")


def test_bench_ppl_json(capsys, tiny_models, backend):
    code, out, err = cli(
        capsys,
        "bench",
        "ppl",
        "--backend",
        backend,
        "-m",
        str(tiny_models["llama"]),
        "--json",
        "--weights",
        "fp32",
        "--text",
        str(DATA / "wikitext2_test.txt"),
        "--window",
        "64",
        "--windows",
        "2",
        "--chunk",
        "16",
    )
    assert code == 0, err
    stats = json.loads(out)
    assert stats["tokens"] == 2 * 63 and stats["windows"] == 2
    assert stats["cache_bytes_per_token"] == 2 * 2 * 32 * 4  # fp32 K/V
    assert stats["fp16_kv_bytes_per_token"] == 2 * 2 * 32 * 2
    assert stats["weight_bytes"] > 0 and stats["backend"] == backend and stats["device"] == "cpu"
    assert 1 < stats["ppl"] < 1e6


def test_console_script_and_debug_traceback():
    exe = Path(sys.executable).with_name("xqchat")
    done = subprocess.run([str(exe), "run", "-m", "nope", "hi"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "xqchat: error: unknown model 'nope': use one of default, smollm2-135m, "
        "a pulled model (NAMESPACE/REPO), a model directory or a .gguf file"
    ]
    done = subprocess.run(
        [str(exe), "--debug", "run", "-m", "nope", "hi"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" in done.stderr and "XQError" in done.stderr


def test_mlx_has_no_cuda_device(capsys):
    code, _, err = cli(capsys, "run", "--backend", "mlx", "--device", "cuda", "hi")
    assert code == 1
    one_line_error(err, "the MLX backend has no CUDA device; use --backend torch")


def test_bench_ppl_reports_compressed_bytes(capsys, tiny_models, backend):
    args = [
        "bench",
        "ppl",
        "--backend",
        backend,
        "-m",
        str(tiny_models["llama"]),
        "--json",
        "--weights",
        "fp32",
        "--text",
        str(DATA / "wikitext2_test.txt"),
        "--windows",
        "1",
        "--chunk",
        "16",
        "--cache",
        "kv-quant",
        "--bits",
        "4",
        "--group",
        "32",
        "--residual",
        "16",
    ]
    code, out, err = cli(capsys, *args, "--window", "100")
    stats = json.loads(out)
    assert code == 0, err
    # 2 blocks of 32 tokens: per channel K (32 x 32 codes at 4 bits + 32 x 4) and per token V
    assert (
        stats["bytes_per_token"]
        == 2 * (2 * 32 * 32 // 2 + 2 * 32 * 4 + 2 * 32 * 32 // 2 + 2 * 32 * 4) / 64
    )
    assert stats["residual_bytes"] == 2 * 2 * 36 * 32 * 4
    code, out, err = cli(capsys, *args, "--window", "40")  # never outgrows the exact window
    stats = json.loads(out)
    assert code == 0 and stats["bytes_per_token"] is None and stats["compression"] is None
