"""`xqchat train-drafter`: self-distillation writes a drafter that run/bench load, and resumes."""

import json

import pytest
import torch
from conftest import cli
from safetensors import safe_open


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
        "training-state.safetensors",
    }
    config = json.loads((out / "drafter.json").read_text())
    assert config["dim"] == 64 and 0 < config["draft_vocab"] <= 64
    with safe_open(out / "training-state.safetensors", "pt") as f:
        assert int(f.metadata()["step"]) == 3

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


def test_drafter_auto_without_a_trained_drafter_speculates_with_lookup(tiny_models, capsys):
    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.backends.drafter import LookupOnly
    from xqchat.models import resolve

    model = str(tiny_models["qwen2"])
    code, out, err = cli(capsys, "run", "-m", model, "--drafter", "auto", "--json", "Hi")
    assert code == 0, err
    assert json.loads(out)["accepted_per_step"] >= 1
    engine = load_model(resolve(model), EngineOptions(drafter="auto"))
    assert isinstance(engine.drafter, LookupOnly) and engine.speculation.largest.lookup == 7


def test_training_state_round_trips_weights_and_moments(tmp_path):
    from xqchat.backends.cuda.train_drafter import load_state, save_state

    def fresh():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.SiLU(), torch.nn.Linear(3, 2))
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    net, optimizer = fresh()
    for _ in range(2):
        optimizer.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    save_state(tmp_path / "state.safetensors", net, optimizer, 2)
    other, other_optimizer = fresh()
    assert load_state(tmp_path / "state.safetensors", other, other_optimizer) == 2
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[i][name], loaded[i][name])


def test_batched_answers_are_the_engines_greedy_answers(tiny_models, default_tokenizer):
    """Training labels come from transformers' batched generate (left-padded); they must be what
    our own engine says greedily, or the drafter learns another model, and the hidden states that
    come with them must be the engine's own final hidden states (its conditioning at run time)."""
    import torch

    from xqchat.app.bench import render_prompts
    from xqchat.backends.base import EngineOptions, GenerationConfig, load_model
    from xqchat.backends.cuda.train_drafter import greedy_answers
    from xqchat.models.registry import resolve

    files = resolve(str(tiny_models["llama"]))
    engine = load_model(files, EngineOptions(backend="torch", weights="fp32"))
    texts = ["Hi", "Tell me a long story about the sea, please.", "Why?"]
    prompts = render_prompts(default_tokenizer, texts, 0)
    assert len({len(p) for p in prompts}) == 3  # really padded

    def check(stop):
        groups = [prompts[:2], prompts[2:]]
        answers = [a for g in greedy_answers(files, groups, 10, stop, torch.float32) for a in g]
        cfg = GenerationConfig(max_tokens=10, stop_tokens=stop)
        for ids, (answer, hidden) in zip(prompts, answers, strict=True):
            session = engine.new_session()
            session.prefill(ids)
            assert answer == [e.token for e in session.generate(cfg)]  # ends with a stop token
            tokens = torch.tensor([ids + answer])
            own = engine.module(tokens, engine.module.new_caches(engine.cache))[0]
            assert hidden.shape == (len(ids) + len(answer) - 1, own.shape[-1])
            torch.testing.assert_close(hidden, own[:-1], rtol=1e-4, atol=1e-4)
        return [answer for answer, _ in answers]

    answers = check(frozenset({2}))  # the real stop token
    assert len(check(frozenset({answers[0][3]}))[0]) <= 4  # one the first answer says early


def test_examples_pair_each_draft_position_with_the_targets_state_and_token_there():
    from xqchat.backends.cuda.train_drafter import Examples, distillation_loss

    # two answers laid end to end; hidden state i is (i, i, ...) so positions can be read back
    records = [
        {"tokens": torch.arange(10, 17), "hidden": torch.arange(7.0)[:, None].repeat(1, 3)},
        {"tokens": torch.arange(20, 26), "hidden": torch.arange(7.0, 13)[:, None].repeat(1, 3)},
    ]
    records[0]["start"], records[1]["start"] = 2, 1
    to_draft = torch.full((32,), -100)
    to_draft[12:26] = torch.arange(14)
    examples = Examples(records, 3, to_draft)
    hidden, inputs, teacher, labels = examples.batch(torch.arange(len(examples)))
    # t runs from each answer's start to len - L - 1: 2..3 in the first answer, 1..2 in the second
    assert hidden[:, 0].tolist() == [2, 3, 8, 9]
    assert inputs.tolist() == [[13, 14], [14, 15], [22, 23], [23, 24]]
    assert teacher[:, :, 0].tolist() == [[3, 4], [4, 5], [9, 10], [10, 11]]
    assert labels.tolist() == [[2, 3], [3, 4], [11, 12], [12, 13]]

    # the loss is least (zero gradient) where the drafter's distribution is the target's own
    head = torch.randn(5, 3)
    logits = (teacher @ head.T).requires_grad_()
    distillation_loss(logits, teacher, head).backward()
    assert logits.grad.abs().max() < 1e-6
    shifted = (teacher @ head.T + torch.randn(4, 2, 5)).requires_grad_()
    distillation_loss(shifted, teacher, head).backward()
    assert shifted.grad.abs().max() > 1e-3


def test_built_in_prompts_are_distinct_and_keep_mt_bench_out(mt_bench_prompts):
    """The drafter is measured on MT-Bench, so its training prompts share no MT-Bench question."""
    from xqchat.app.drafter_prompts import default_prompts

    prompts = default_prompts(2000)
    assert len(set(prompts)) == len(prompts) == 2000
    assert default_prompts(100) == prompts[:100]  # a longer run extends a shorter one's prompts
    assert not set(prompts) & set(mt_bench_prompts)


def test_answering_resumes_at_the_first_unanswered_batch(tiny_models, default_tokenizer, tmp_path):
    """Answering the prompts takes most of a training run: an interrupted one keeps every batch
    it finished, answers only the rest when run again, and ends with what one run would give."""
    from xqchat.app.bench import render_prompts
    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.backends.cuda.train_drafter import TrainConfig, answer
    from xqchat.models.registry import resolve

    files = resolve(str(tiny_models["llama"]))
    engine = load_model(files, EngineOptions(backend="torch", weights="fp32"))
    texts = ["Hi", "Tell me about the sea.", "Why?", "Name a colour.", "Count to three."]
    prompts = render_prompts(default_tokenizer, texts, 0)
    cfg, stop = TrainConfig(new_tokens=6, answer_batch=2), frozenset({2})
    whole = answer(engine, files, prompts, cfg, stop, lambda i, n: None, tmp_path / "whole")

    class Interrupted(Exception):
        pass

    def interrupt_after_a_batch(done, n):
        if done >= 2:
            raise Interrupted

    parts = tmp_path / "parts"
    with pytest.raises(Interrupted):
        answer(engine, files, prompts, cfg, stop, interrupt_after_a_batch, parts)
    assert sorted(p.name for p in parts.iterdir()) == ["000000.safetensors"]
    reports = []
    resumed = answer(engine, files, prompts, cfg, stop, lambda i, n: reports.append(i), parts)
    assert reports == [2, 4, 5]  # the first batch was not answered again
    for a, b in zip(resumed, whole, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and a["start"] == b["start"]
        assert torch.equal(a["hidden"], b["hidden"])

    # a batch saved for other prompts (e.g. another --limit) is answered again, not reused
    reports.clear()
    other = render_prompts(default_tokenizer, ["Hello", *texts[1:]], 0)
    answer(engine, files, other, cfg, stop, lambda i, n: reports.append(i), parts)
    assert reports == [3, 5]
