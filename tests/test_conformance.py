"""One set of expectations for every backend on this machine (the `backend` fixture): logits
against transformers, greedy generation, prefix reuse, trim, byte accounting, sampling."""

import functools

import numpy as np
import pytest
import torch
from conftest import load_tiny
from transformers import AutoModelForCausalLM, DynamicCache

from xqchat.backends.base import CacheSpec, EngineOptions, GenerationConfig, load_model
from xqchat.backends.chat import ChatSession, common_prefix
from xqchat.models import resolve

ARCHS = ["llama", "llama3", "mha", "mistral", "qwen2", "qwen3"]
# architectures beyond the Llama family proper (issue 28)
NEW_ARCHS = ["smollm3", "phi3", "phi4", "mistral-window", "gemma3"]
TOL = 1e-4


def pieces(session, ids, splits):
    """Logits for every position, fed as a prefill then pieces of the given sizes (1 = decode)."""
    out, start = [], 0
    for size in splits:
        out.append(session.logits(ids[start : start + size]))
        start += size
    return np.concatenate(out)


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


@functools.cache
def tiny_pair(path, backend):
    """transformers' model and ours (fp32) of one tiny model, loaded once for this module."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(
        resolve(str(path)), EngineOptions(backend=backend, weights="fp32", device="cpu")
    )
    return hf, ours


@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
def test_tiny_logits_match_transformers(tiny_models, backend, arch):
    hf, ours = tiny_pair(tiny_models[arch], backend)
    ids = torch.randint(0, 49152, (1, 90), generator=torch.Generator().manual_seed(7))[0].tolist()
    # prefill 40, five single-token decodes, a 20-token append, then 25 more in one piece
    got = pieces(ours.new_session(), ids, [40, 1, 1, 1, 1, 1, 20, 25])
    assert np.abs(got - hf_logits(hf, ids)).max() <= TOL


def hf_greedy(model, prompt, n):
    """transformers' greedy tokens, each from a full forward of everything before it (no cache:
    generate's cache machinery costs seconds a token on a tiny model here)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_tiny_greedy_tokens_match_transformers(tiny_models, backend, arch):
    """48 greedy tokens past the sliding window (16) from a 20-token prompt, as transformers'."""
    hf, ours = tiny_pair(tiny_models[arch], backend)
    prompt = list(range(2000, 2020))
    assert greedy(ours.new_session(), prompt, 48) == hf_greedy(hf, prompt, 48)


def hf_pieces(model, ids, splits):
    """transformers' logits with `ids` fed in pieces through its cache."""
    cache, out, start = DynamicCache(), [], 0
    with torch.inference_mode():
        for size in splits:
            piece = torch.tensor([ids[start : start + size]])
            out.append(model(piece, past_key_values=cache, use_cache=True).logits[0].numpy())
            start += size
    return np.concatenate(out)


ACROSS = [120] + [1] * 16 + [30]  # decode steps across LongRoPE's original length, then a piece


@pytest.mark.parametrize("splits", [ACROSS, [200]], ids=["across", "past"])
def test_longrope_switches_to_its_long_factors_as_transformers(tiny_models, backend, splits):
    """Phi-3's LongRoPE (original length 128 of 256): a forward whose last position is past it
    rotates its tokens with the long factors, the rows fed before keep the short ones."""
    hf, ours = tiny_pair(tiny_models["phi3"], backend)
    assert ours.spec.max_context == 256 and ours.spec.rope.long() is not None
    ids = list(range(2000, 2000 + sum(splits)))
    got = pieces(ours.new_session(), ids, splits)
    assert np.abs(got - hf_pieces(hf, ids, splits)).max() <= TOL


@pytest.mark.parametrize("kind", ["kv-quant", "xquant"])
def test_kinds_that_rotate_every_step_keep_each_rows_factors(tiny_models, backend, kind):
    """kv-quant and XQuant rotate every cached key at each step: across the switch, each row
    keeps the factors it was fed with, as `kv` holds them (every row exact: residual 256; 8 bits,
    so the CPU rebuilds XQuant's keys in float)."""
    _, ours = tiny_pair(tiny_models["phi3"], backend)
    ids = list(range(2000, 2000 + sum(ACROSS)))
    expected = pieces(ours.new_session(), ids, ACROSS)
    got = pieces(ours.new_session(CacheSpec(kind, bits=8, residual=256)), ids, ACROSS)
    assert np.abs(got - expected).max() <= TOL


def test_longrope_trim_save_and_trees_keep_each_rows_factors(tiny_models, backend, tmp_path):
    """Back within the original length, where a fresh run rotates every row with the short
    factors, a trim feeds the rows rotated with the long ones again; a saved session keeps where
    it switched; a drafter's trees across the switch give a plain run's tokens."""
    _, ours = tiny_pair(tiny_models["phi3"], backend)
    ids = list(range(2000, 2150))
    session = ours.new_session()
    session.logits(ids[:100])
    session.logits(ids[100:140])  # past 128: all of this piece rotates with the long factors
    session.save(tmp_path / "chat.safetensors")
    session.trim(120)
    fresh = ours.new_session()
    fresh.logits(ids[:120])
    assert np.abs(session.logits(ids[120:130]) - fresh.logits(ids[120:130])).max() <= TOL
    loaded, kept = ours.new_session(), ours.new_session()
    loaded.load(tmp_path / "chat.safetensors")
    pieces(kept, ids, [100, 40])
    assert np.abs(loaded.logits(ids[140:150]) - kept.logits(ids[140:150])).max() <= 1e-6
    prompt = [5, 6, 7, 8, 9] * 22  # 110 tokens: prompt lookup drafts across 128
    plain = load_tiny(tiny_models, "phi3", backend, drafter="none")
    runs = []
    for model in (plain, ours):  # ours speculates with prompt lookup (the default)
        session = model.new_session()
        session.prefill(prompt)
        runs.append(list(session.generate(GenerationConfig(max_tokens=40))))
    assert [e.token for e in runs[0]] == [e.token for e in runs[1]]
    assert runs[1][-1].accepted_per_step > 1


def test_spec_features_are_exercised(tiny_models):
    specs = {a: resolve(str(tiny_models[a])) for a in ARCHS}
    specs = {a: load_model(f, EngineOptions(weights="fp32")).spec for a, f in specs.items()}
    assert specs["qwen2"].qkv_bias and not specs["llama"].qkv_bias
    assert specs["qwen3"].qk_norm and specs["qwen3"].head_dim == 32
    assert specs["llama3"].rope.type == "llama3"
    assert specs["mha"].n_kv_heads == specs["mha"].n_heads
    assert specs["qwen2"].tied_embeddings and not specs["qwen3"].tied_embeddings


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_fp32, hf_default):
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 7018, 411, 2038, 4753, 19]
    ids += list(range(1000, 1024))
    expected = hf_logits(hf_default, ids)
    got = pieces(default_fp32.new_session(), ids, [len(ids) - 16] + [1] * 16)  # prefill, 16 decodes
    # 30 layers of fp32: PyTorch's summation order stays within 1e-4 of transformers; MLX's CPU
    # kernels sum in another order (7e-6 of the logit range, measured 2.3e-4 absolute).
    tol = TOL if default_fp32.backend == "torch" else 1e-5 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= tol


@pytest.mark.parametrize("weights, tol", [("fp16", 2e-2), ("bf16", 6e-2)])
def test_half_precision_weights_stay_close_to_fp32(tiny_models, backend, weights, tol):
    path = resolve(str(tiny_models["llama3"]))
    ids = list(range(700, 760))
    exact = pieces(
        load_model(path, EngineOptions(backend=backend, weights="fp32")).new_session(),
        ids,
        [50, 1, 9],
    )
    half = pieces(
        load_model(path, EngineOptions(backend=backend, weights=weights)).new_session(),
        ids,
        [50, 1, 9],
    )
    assert np.abs(half - exact).max() <= tol * np.abs(exact).max()


def greedy(session, prompt, n):
    session.prefill(prompt)
    return [e.token for e in session.generate(GenerationConfig(max_tokens=n))]


@pytest.fixture(scope="module")
def transformers_greedy(hf_default, default_tokenizer, mt_bench_prompts):
    """transformers' 48 greedy tokens on 3 MT-Bench prompts, generated once for both backends."""
    out = []
    for text in mt_bench_prompts[:3]:
        prompt = default_tokenizer.render([{"role": "user", "content": text}])
        with torch.inference_mode():
            tokens = hf_default.generate(
                torch.tensor([prompt]),
                max_new_tokens=48,
                min_new_tokens=48,
                do_sample=False,
                pad_token_id=0,
            )
        out.append((prompt, tokens[0, len(prompt) :].tolist()))
    return out


@pytest.mark.slow
def test_greedy_tokens_identical_to_transformers(default_fp32, transformers_greedy):
    """48 greedy tokens on 3 MT-Bench prompts equal transformers' generate, so every backend also
    produces the same text as every other."""
    for prompt, expected in transformers_greedy:
        assert greedy(default_fp32.new_session(), prompt, 48) == expected


def test_second_turn_prefills_only_the_new_suffix(default_fp32, default_tokenizer):
    chat = ChatSession(default_fp32, default_tokenizer, system="Answer briefly.")
    cfg = GenerationConfig(max_tokens=12)
    first = list(chat.send("Name a colour.", cfg))
    assert first[-1].cached_tokens == 0
    assert first[-1].prompt_tokens == len(default_tokenizer.render(chat.messages[:2]))
    held = list(chat.session.tokens)
    second = list(chat.send("And a fruit?", cfg))
    full = default_tokenizer.render(chat.messages[:4])
    reused = common_prefix(held, full)
    assert reused > first[-1].prompt_tokens  # the whole first turn's prompt, and more
    assert second[-1].cached_tokens == reused
    assert second[-1].prompt_tokens == len(full) - reused
    assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"]


def test_trim_then_decode_equals_fresh_run(default_fp32, default_tokenizer):
    prompt = default_tokenizer.render([{"role": "user", "content": "Tell me about the moon."}])
    fresh = greedy(default_fp32.new_session(), prompt, 20)
    session = default_fp32.new_session()
    greedy(session, prompt + fresh[:5], 30)  # run past the point, then roll back
    session.trim(len(prompt) + 2)
    assert session.tokens == prompt + fresh[:2]
    assert greedy(session, fresh[2:5], 15) == fresh[5:20]


def test_cache_bytes_are_exact(default_fp32, default_tokenizer):
    spec = default_fp32.spec
    session = default_fp32.new_session()
    prompt = default_tokenizer.encode("One two three four five six seven.")
    session.prefill(prompt)
    events = list(session.generate(GenerationConfig(max_tokens=9)))
    held = len(prompt) + 8  # the last sampled token is not fed back
    per_token = spec.n_layers * 2 * spec.n_kv_heads * spec.head_dim
    assert len(session.tokens) == held
    assert events[-1].cache_bytes == session.memory().cache_bytes == held * per_token * 4  # fp32
    assert events[-1].fp16_kv_bytes == held * per_token * 2
    assert session.memory().reserved_bytes >= session.memory().cache_bytes
    session.trim(3)
    assert session.memory().cache_bytes == 3 * per_token * 4


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(default_fp32, default_tokenizer):
    prompt = default_tokenizer.render([{"role": "user", "content": "Write a word."}])

    def run(**kw):
        s = default_fp32.new_session()
        s.prefill(prompt)
        return [e.token for e in s.generate(GenerationConfig(max_tokens=12, **kw))]

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    assert run(temperature=1.0, top_p=1e-6, seed=5) == run()  # only the top token survives


def test_logprobs_agree_with_logits(default_fp32):
    ids = list(range(2000, 2012))
    a, b = default_fp32.new_session(), default_fp32.new_session()
    a.prefill(ids[:4])
    logprobs = a.logprobs(ids[4:])
    logits = b.logits(ids)[3:-1].astype(np.float64)
    expected = (
        logits[np.arange(8), ids[4:]]
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        - logits.max(-1)
    )
    np.testing.assert_allclose(logprobs, expected, rtol=2e-5, atol=1e-4)  # fed in two pieces vs one


def test_stop_token_ends_the_reply_and_is_not_text(default_fp32, default_tokenizer):
    chat = ChatSession(default_fp32, default_tokenizer)
    events = list(chat.send("What is the capital of France?", GenerationConfig(max_tokens=64)))
    assert events[-1].finish_reason == "stop"
    assert events[-1].token in default_tokenizer.stop_tokens and events[-1].text == ""
    assert "Paris" in chat.messages[-1]["content"]
    assert "".join(e.text for e in events) == chat.messages[-1]["content"]
