"""Generation, prefix reuse, trim and byte accounting on the real default model."""

import torch
from xqchat.backends.base import GenerationConfig
from xqchat.backends.chat import ChatSession, common_prefix


def greedy(session, prompt, n):
    session.prefill(prompt)
    return [e.token for e in session.generate(GenerationConfig(max_tokens=n))]


def test_greedy_tokens_identical_to_transformers(
    default_fp32, hf_default, default_tokenizer, mt_bench_prompts
):
    for text in mt_bench_prompts[:5]:
        prompt = default_tokenizer.render([{"role": "user", "content": text}])
        with torch.inference_mode():
            out = hf_default.generate(
                torch.tensor([prompt]),
                max_new_tokens=48,
                min_new_tokens=48,
                do_sample=False,
                pad_token_id=0,
            )
        expected = out[0, len(prompt) :].tolist()
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
    events = list((session.prefill(prompt), *session.generate(GenerationConfig(max_tokens=9))))[1:]
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


def test_stop_token_ends_the_reply_and_is_not_text(default_fp32, default_tokenizer):
    chat = ChatSession(default_fp32, default_tokenizer)
    events = list(chat.send("What is the capital of France?", GenerationConfig(max_tokens=64)))
    assert events[-1].finish_reason == "stop"
    assert events[-1].token in default_tokenizer.stop_tokens and events[-1].text == ""
    assert "Paris" in chat.messages[-1]["content"]
    assert "".join(e.text for e in events) == chat.messages[-1]["content"]


def test_detokenizer_streams_exactly_the_decoded_text(default_tokenizer):
    text = "Grüße 👋🏽 from 東京!\nLine two:\n\n  indented — done."
    detok = default_tokenizer.detokenizer()
    pieces = [detok.add(t) for t in default_tokenizer.encode(text)]
    assert "".join(pieces) == detok.text == text
