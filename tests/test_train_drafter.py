"""`xqchat train-drafter`: self-distillation writes a drafter that run/bench load, and resumes."""

import json

import torch
from conftest import cli


def test_train_drafter_writes_a_drafter_that_runs_and_resumes(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    questions = ["Tell me about cats.", "What is rain?", "Name a river.", "Count to five."]
    prompts.write_text("".join(json.dumps({"turns": [q]}) + "\n" for q in questions))
    model, out = str(tiny_models["qwen2"]), tmp_path / "drafter"
    args = ["-m", model, "--prompts", str(prompts), "--new-tokens", "12", "--out", str(out)]
    code, stdout, err = cli(capsys, "train-drafter", *args, "--steps", "3", "--draft-vocab", "64")
    assert code == 0, err
    assert "after 3 steps" in stdout and "answering" in err and "training" in err
    assert {p.name for p in out.iterdir()} == {
        "drafter.json",
        "drafter.safetensors",
        "answers.safetensors",
        "training-state.pt",
    }
    config = json.loads((out / "drafter.json").read_text())
    assert config["dim"] == 64 and 0 < config["draft_vocab"] <= 64
    assert torch.load(out / "training-state.pt", weights_only=True)["step"] == 3

    answered = (out / "answers.safetensors").stat().st_mtime_ns
    code, stdout, err = cli(capsys, "train-drafter", *args, "--steps", "5", "--draft-vocab", "64")
    assert code == 0 and "after 5 steps" in stdout
    assert "answering" not in err  # the saved answers are reused
    assert (out / "answers.safetensors").stat().st_mtime_ns == answered

    code, stdout, err = cli(
        capsys, "run", "-m", model, "--drafter", str(out), "--max-tokens", "10", "--json", "Hi"
    )
    assert code == 0, err
    stats = json.loads(stdout)
    assert stats["new_tokens"] == 10 and 1 <= stats["accepted_per_step"] <= 4


def test_drafter_auto_without_a_trained_drafter_says_how_to_get_one(tiny_models, capsys):
    code, _, err = cli(capsys, "run", "-m", str(tiny_models["qwen2"]), "--drafter", "auto", "Hi")
    assert code != 0
    assert "no drafter for qwen2: train one with `xqchat train-drafter" in err
    assert "Traceback" not in err
