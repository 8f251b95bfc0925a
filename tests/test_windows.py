"""Sliding-window layers (tiny Gemma 3: a window of 16 in layer 0, layer 1 global): the window
layer's cache holds only its window in every cache kind, and trim, prefix reuse, speculation and
save/load stay exactly what a fresh run gives, in every backend."""

import numpy as np
import pytest
from conftest import WIDE, cli, load_tiny, write_tiny

from xqchat.backends import planner
from xqchat.backends.base import CacheSpec, EngineOptions, GenerationConfig, load_model
from xqchat.backends.chat import ChatSession
from xqchat.models import resolve

WINDOW = 16
IDS = list(range(3000, 3090))
QUANTIZED = ["kv-quant", "xquant", "xquant-cl"]


@pytest.fixture(scope="module")
def gemma(tiny_models, backend):
    # plain decoding: a speculative reply can end with a tree's rows beside the ring, which the
    # next checkpoint then holds too (test_speculation_and_save_load_keep_the_window_exact)
    return load_tiny(tiny_models, "gemma3", backend, drafter="none")


def row_bytes(model) -> int:
    return 2 * model.spec.kv_dim * 4  # K and V of one token, fp32


def test_a_window_layer_holds_only_its_window(gemma):
    session = gemma.new_session()
    session.prefill(IDS[:40])
    window, full = session.caches
    assert window.nbytes == WINDOW * row_bytes(gemma)  # the newest 16 rows of the 40
    for n, token in enumerate(IDS[40:70], start=41):
        session.logits([token])
        assert window.nbytes == WINDOW * row_bytes(gemma)  # never past the window
        assert full.nbytes == n * row_bytes(gemma)


def fresh_logits(model, ids, split, cache=None):
    session = model.new_session(cache)
    return np.concatenate([session.logits(ids[:split]), session.logits(ids[split:])])


def first_event(session, prompt):
    session.prefill(prompt)
    return next(iter(session.generate(GenerationConfig(max_tokens=1))))


@pytest.mark.parametrize(
    ("keep", "kind"),
    [(59, "kv"), (35, "kv"), (10, "kv")] + [(k, q) for k in (35, 10) for q in QUANTIZED],
)
def test_trim_across_the_window_boundary_is_exact(gemma, keep, kind):
    """Checkpoints at 30 and 60 (the two prefills' ends): 59 is one token back from 60, 35 needs
    the checkpoint at 30 and 5 tokens fed again, 10 needs a checkpoint there is none of (all
    fed again); each is counted in the next prefill's tokens. The quantized kinds keep every row
    exact here (residual 128: whole exact groups leave the window), so any difference from a
    fresh run would be the window's; they go back to a checkpoint (35) or start afresh (10)."""
    cache = CacheSpec(kind, group=32)
    session = gemma.new_session(cache)
    session.prefill(IDS[:30])
    session.prefill(IDS[30:60])
    session.logits(IDS[60:80])
    session.trim(keep)
    assert session.tokens == IDS[:keep] and session.caches[0].offset == keep
    refilled = {59: 0, 35: 5, 10: 10}[keep]
    event = first_event(session, IDS[keep : keep + 3])
    assert (event.prompt_tokens, event.cached_tokens) == (3 + refilled, keep - refilled)
    got = session.logits(IDS[keep + 3 : keep + 10])
    expected = fresh_logits(gemma, IDS[: keep + 10], keep, cache)[keep + 3 :]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_chat_past_the_window_prefills_only_new_tokens(gemma, default_tokenizer):
    """Four turns on a model whose window (16) is smaller than the chat: each turn after the
    first prefills only what the cache does not hold, and replies as a fresh run on the whole
    conversation does."""
    chat = ChatSession(gemma, default_tokenizer, system="Be brief.")
    cfg = GenerationConfig(max_tokens=12)
    for turn, text in enumerate(["Hi there", "Name a colour.", "And a fruit?", "Thanks!"]):
        events = list(chat.send(text, cfg))
        prompt = default_tokenizer.render(chat.messages[:-1])
        last = events[-1]
        assert last.prompt_tokens + last.cached_tokens == len(prompt)
        if turn:
            assert last.cached_tokens > WINDOW  # the conversation so far, past the window, was kept
        fresh = gemma.new_session()
        fresh.prefill(prompt)
        assert [e.token for e in events] == [e.token for e in fresh.generate(cfg)]
    # the window layer's state at the last prompts' starts and ends: 16 rows each, counted
    states = [s for states in chat.session.checkpoints.values() for s in states.values()]
    assert len(states) == 4 and all(s["keys"].shape[2] == WINDOW for s in states)
    rows = len(states) * WINDOW * row_bytes(gemma)
    assert rows < chat.session.memory().checkpoint_bytes <= rows + 8 * len(states)


@pytest.mark.parametrize("kind", ["kv", "kv-quant", "xquant-cl"])  # xquant: xquant-cl's path
def test_speculation_and_save_load_keep_the_window_exact(tiny_models, backend, tmp_path, kind):
    """Prompt lookup's trees are verified beside the ring (kv) or the kept groups and only their
    accepted path joins it: the tokens are a plain run's; a saved window session loads to the
    same next logits."""
    plain = load_tiny(tiny_models, "gemma3", backend)
    looking = load_tiny(tiny_models, "gemma3", backend, drafter="lookup")
    prompt = [5, 6, 7, 8, 9] * 6
    cache = CacheSpec(kind, bits=4, group=32, residual=8)  # groups flushed, then dropped
    cfg = GenerationConfig(max_tokens=40)
    runs = []
    for model in (plain, looking):
        session = model.new_session(cache)
        session.prefill(prompt)
        runs.append(list(session.generate(cfg)))
    assert [e.token for e in runs[0]] == [e.token for e in runs[1]]
    assert runs[1][-1].accepted_per_step > 1  # trees were verified and paths kept
    session.save(tmp_path / "chat.safetensors")
    loaded = looking.new_session(cache)
    loaded.load(tmp_path / "chat.safetensors")
    np.testing.assert_array_equal(loaded.logits([11, 12]), session.logits([11, 12]))
    # its checkpoints came with it: back to the prompt's end with nothing fed again
    assert sorted(loaded.checkpoints) == [len(prompt)]
    loaded.trim(len(prompt) - 1)
    assert first_event(loaded, prompt[-1:]).prompt_tokens == 1


def test_show_names_the_sliding_window(capsys, tiny_models):
    code, out, _ = cli(capsys, "show", str(tiny_models["gemma3"]))
    assert code == 0 and "a 16-token sliding window in 1 of 2 layers" in out


@pytest.fixture(scope="module")
def deep_gemma_files(default_tokenizer, tmp_path_factory):
    """Gemma 3 with six window layers and two global ones, K/V narrower than X (XQuant's SVD
    latents), so XQuant-CL's window chain has layers past its base that store differences."""
    from transformers import Gemma3TextConfig

    types = (["sliding_attention"] * 3 + ["full_attention"]) * 2
    config = Gemma3TextConfig(
        **{**WIDE, "num_hidden_layers": 8},
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=types,
    )
    return resolve(
        str(write_tiny(config, tmp_path_factory.mktemp("gemma8") / "m", 8, default_tokenizer))
    )


def keeping_every_row(session):
    """The same caches with the window layers keeping every row (their attention masked to the
    window, as before)."""
    for cache in session.caches:
        cache.window = 0
        for store in cache.stores:
            store.window = 0
    return session


@pytest.mark.parametrize("kind", QUANTIZED)
def test_every_kind_holds_only_the_groups_its_window_overlaps(deep_gemma_files, backend, kind):
    """Through a prompt and 24 decode steps past the window, each window layer holds at most the
    window plus one group's straddle (exactly the planner's bytes), and the logits are those of
    the same kind keeping every row."""
    model = load_model(deep_gemma_files, EngineOptions(backend=backend, weights="fp32"))
    cache = CacheSpec(kind, bits=4, group=32, residual=8)  # blocks flushed inside the window
    held, full = model.new_session(cache), keeping_every_row(model.new_session(cache))
    ids = list(range(3000, 3064))
    for session in (held, full):
        session.prefill(ids[:40])
    for n, token in enumerate(ids[40:], start=41):
        got, expected = held.logits([token]), full.logits([token])
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), n
        assert held.memory().cache_bytes == planner.cache_bytes(model.spec, cache, n, 4), n
        for i in (0, 1, 2, 4, 5, 6):  # the window layers
            assert WINDOW <= n - held.caches[i].first <= WINDOW + cache.group - 1, (n, i)
    assert full.caches[0].first == 0 and full.caches[0].nbytes > held.caches[0].nbytes
