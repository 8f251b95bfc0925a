"""Speculative decoding with the recurrent drafter, in every backend and with every cache kind:
the same greedy text as plain decoding, the same cache afterwards, the same sampling distribution.

A drafter with random weights rarely guesses right, so most tests use an oracle drafter that
proposes what the target itself would choose on some beams and wrong tokens on others: every
acceptance length, from nothing to whole beams, is exercised."""

import dataclasses
import importlib.util

import numpy as np
import pytest

from xqchat.backends.base import CacheSpec, EngineOptions, GenerationConfig, load_model
from xqchat.backends.drafter import WEIGHTS, DrafterConfig, processed_probs, target_key
from xqchat.models import resolve

SMALL_WINDOWS = dict(bits=4, group=32, residual=8)  # flushes within the tests' lengths
PROMPTS = [list(range(300, 317)), [5, 9, 77, 1000, 42] * 3, list(range(2000, 2041, 3))]


def on_engine(fn):
    """Run fn where the engine's arrays live (MLX arrays belong to the engine thread)."""
    if importlib.util.find_spec("mlx") is None:
        return fn()
    from xqchat.backends.mlx.session import ENGINE

    return ENGINE.call(fn)


def to_numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        return on_engine(lambda: np.array(x.astype(mx.float32)))
    return x.float().cpu().numpy()


def cache_arrays(session) -> list[dict]:
    def read():
        return [
            {name: to_numpy(array) for name, array in cache.state_dict().items()}
            for cache in session.caches
        ]

    return on_engine(read)


class OracleDrafter:
    """Proposes beams after `token` from `choices(context)`, the tokens a target would pick after
    `context`, best first: beam b takes the b-th choice at one depth picked at random and the
    first choice elsewhere, or (with probability `wrong`) a random token."""

    def __init__(self, session, choices, seed=0, wrong=0.3):
        self.session, self.choices = session, choices
        self.rng = np.random.default_rng(seed)
        self.wrong = wrong
        self.calls = 0

    def draft(self, hidden, token, width, length):
        self.calls += 1
        context = (*self.session.tokens, token)
        beams = np.empty((width, length), dtype=np.int64)
        for b in range(width):
            beam, branch, lost = [token], self.rng.integers(1, length), False
            for depth in range(1, length):
                lost = lost or self.rng.random() < self.wrong
                if lost:  # once off the target's choices, a beam stays off them
                    beam.append(int(self.rng.integers(100, 40000)))
                else:
                    ranked = self.choices((*context, *beam[1:]))
                    beam.append(int(ranked[min(b, len(ranked) - 1) if depth == branch else 0]))
            beams[b] = beam
        return beams


def knows(text: list[int]):
    """choices() that know the greedy text: right on it, arbitrary off it."""

    def choices(context):
        n = len(context)
        if n < len(text) and tuple(text[:n]) == context:
            return [text[n], text[n] + 1, text[n] + 2]
        return [n + 5, n + 6]

    return choices


def asks(model):
    """choices() that ask a plain session of `model` (memoized: contexts repeat)."""
    memo = {}

    def choices(context):
        if context not in memo:
            probe = model.new_session(CacheSpec())
            probe.prefill(list(context))
            logits = to_numpy(probe._next_logits)
            top = np.argpartition(-logits, 4)[:4]
            memo[context] = top[np.argsort(-logits[top])]
        return memo[context]

    return choices


def oracle(model, session, choices, **kwargs):
    drafter = OracleDrafter(session, choices, **kwargs)
    model.drafter, model.beams = drafter, (4, 4)
    return drafter


@pytest.fixture(scope="module")
def tiny(backend, tiny_models):
    """The tests bind their drafter themselves (an always-largest tree: no policy)."""
    return {
        arch: load_model(
            resolve(str(tiny_models[arch])),
            EngineOptions(backend=backend, weights="fp32", drafter="none"),
        )
        for arch in ("qwen2", "gqa-qwen2")
    }


def plain_run(model, cache, prompt, cfg):
    model.drafter = None
    session = model.new_session(cache)
    session.prefill(prompt)
    return session, [e.token for e in session.generate(cfg)]


@pytest.mark.parametrize(
    "arch, kind",
    # qwen2's xquant caches X itself, gqa-qwen2's the SVD latents
    [("qwen2", "kv"), ("qwen2", "kv-quant"), ("qwen2", "xquant-cl"), ("gqa-qwen2", "xquant")]
    + [("gqa-qwen2", "xquant-cl")],
)
def test_greedy_text_and_cache_equal_plain_decoding(tiny, arch, kind):
    model = tiny[arch]
    cache = CacheSpec(kind=kind, **SMALL_WINDOWS)
    cfg = GenerationConfig(max_tokens=48)  # the prompt and the reply cross a flush
    for seed, prompt in enumerate(PROMPTS[:2]):
        plain, expected = plain_run(model, cache, prompt, cfg)
        session = model.new_session(cache)
        drafter = oracle(model, session, knows(prompt + expected), seed=seed)
        session.prefill(prompt)
        events = list(session.generate(cfg))
        model.drafter = None
        assert [e.token for e in events] == expected
        assert 1.5 < events[-1].accepted_per_step <= 4
        assert drafter.calls < len(expected) / 1.5
        # the caches hold the same tokens, stored the same way (same blocks flushed, same rows)
        assert session.tokens == plain.tokens
        for sa, sb in zip(cache_arrays(session), cache_arrays(plain), strict=True):
            assert sa.keys() == sb.keys()
            for name, x in sa.items():
                y = sb[name]
                assert x.shape == y.shape, name
                # a tree and a step sum in different orders (on a GPU, products of different
                # row counts round differently; on the CPU, keys rebuilt in int8 carry that noise
                # across their own rounding edges): a code may differ, a half by one step
                if name.endswith("codes"):
                    assert (x != y).sum() <= max(2, x.size // 1000), name
                else:
                    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-3, err_msg=name)
        # and go on alike: one more plain token from each
        session.prefill([expected[-1]])
        plain.prefill([expected[-1]])
        # (a code on a rounding edge moves a logit by a quantization step's worth)
        atol = 1e-3 if kind in ("kv", "xquant") else 2e-2
        np.testing.assert_allclose(
            session.logits([7])[-1], plain.logits([7])[-1], atol=atol, rtol=1e-3
        )


@pytest.mark.parametrize(
    "arch, kind", [("qwen2", "kv"), ("qwen2", "xquant-cl"), ("gqa-qwen2", "kv-quant")]
)
def test_a_lookup_beam_is_taken_and_keeps_greedy_text(tiny, arch, kind):
    """Prompt lookup's beam joins the drafter's tree (deeper than its beams, pruned where a
    quantized cache has little room). The drafter here is always wrong, so every token accepted
    beyond the target's own came from lookup, and the reply and cache are still plain greedy's."""
    model = tiny[arch]
    cache = CacheSpec(kind=kind, **SMALL_WINDOWS)
    cfg = GenerationConfig(max_tokens=48)
    prompt = PROMPTS[1]  # repeats itself, and a random model's greedy reply soon does
    plain, expected = plain_run(model, cache, prompt, cfg)
    session = model.new_session(cache)
    oracle(model, session, knows(prompt + expected), wrong=1.0)
    model.lookup = 7
    try:
        session.prefill(prompt)
        events = list(session.generate(cfg))
    finally:
        model.drafter, model.lookup = None, 0
    assert [e.token for e in events] == expected
    assert events[-1].accepted_per_step > 1.25  # the wrong drafter alone gets 1 exactly
    assert session.tokens == plain.tokens
    np.testing.assert_allclose(
        to_numpy(session._next_logits), to_numpy(plain._next_logits), atol=2e-2, rtol=1e-3
    )


def test_drafter_lookup_speculates_without_a_drafter(backend, tiny_models):
    """`--drafter lookup`: any model, no trained drafter; the tree is lookup's beam alone."""
    from xqchat.models import XQError

    files = resolve(str(tiny_models["qwen2"]))
    options = EngineOptions(backend=backend, weights="fp32", drafter="none")
    model = load_model(
        files, dataclasses.replace(options, drafter="lookup", lookup=6, tree="fixed")
    )
    assert model.lookup == 6
    cfg = GenerationConfig(max_tokens=40)
    prompt = PROMPTS[1]
    session = model.new_session()
    session.prefill(prompt)
    events = list(session.generate(cfg))
    expected = plain_run(load_model(files, options), CacheSpec(), prompt, cfg)[1]
    assert [e.token for e in events] == expected
    assert events[-1].accepted_per_step > 1.25
    with pytest.raises(XQError, match="needs --lookup 1 or more"):
        EngineOptions(drafter="lookup", lookup=0)


def test_residual_zero_and_stops_mid_tree(tiny):
    """residual 0 flushes every group; a stop token inside an accepted path ends the reply there
    and the cache holds what a plain run's would."""
    model = tiny["qwen2"]
    cache = CacheSpec(kind="kv-quant", bits=4, group=32, residual=0)
    prompt = PROMPTS[0]
    plain, expected = plain_run(model, cache, prompt, GenerationConfig(max_tokens=50))
    stop = expected[20]
    cut = expected.index(stop) + 1
    cfg = GenerationConfig(max_tokens=50, stop_tokens=frozenset({stop}))
    plain, expected = plain_run(model, cache, prompt, cfg)
    assert len(expected) == cut
    session = model.new_session(cache)
    oracle(model, session, knows(prompt + expected), wrong=0.0)
    session.prefill(prompt)
    events = list(session.generate(cfg))
    model.drafter = None
    assert [e.token for e in events] == expected and events[-1].finish_reason == "stop"
    assert session.tokens == plain.tokens
    np.testing.assert_allclose(
        to_numpy(session._next_logits), to_numpy(plain._next_logits), atol=1e-4, rtol=1e-4
    )


def exact_distribution(model, prompt, cfg, n_tokens, prefix=(), p=1.0) -> dict:
    """Every sequence of n_tokens with its probability under plain sampling (top-p keeps few)."""
    if len(prefix) == n_tokens:
        return {prefix: p}
    session = model.new_session()
    session.prefill(prompt + list(prefix))
    probs = processed_probs(to_numpy(session._next_logits), cfg.temperature, cfg.top_p)
    out = {}
    for token in np.flatnonzero(probs > 0):
        extended = (*prefix, int(token))
        out.update(exact_distribution(model, prompt, cfg, n_tokens, extended, p * probs[token]))
    return out


def test_sampling_keeps_the_target_distribution(tiny):
    model = tiny["qwen2"]
    prompt = PROMPTS[0]
    # a random tiny model is nearly flat: a low temperature leaves a few dozen likely sequences
    cfg = GenerationConfig(max_tokens=3, temperature=0.1, top_p=0.9)
    exact = exact_distribution(model, prompt, cfg, 3)
    assert 4 <= len(exact) <= 200 and abs(sum(exact.values()) - 1) < 1e-9
    session = model.new_session()
    drafter = oracle(model, session, asks(model), wrong=0.2)
    session.prefill(prompt)
    counts: dict[tuple, int] = {}
    runs, accepted = 400, 0
    for seed in range(runs):
        session.trim(len(prompt) - 1)
        session.prefill(prompt[-1:])
        events = list(session.generate(GenerationConfig(**{**cfg.__dict__, "seed": seed})))
        key = tuple(e.token for e in events)
        counts[key] = counts.get(key, 0) + 1
        accepted += events[-1].accepted_per_step > 1
    model.drafter = None
    assert drafter.calls > runs / 2 and accepted > runs / 5  # drafts were tested and taken
    assert set(counts) <= set(exact)
    tv = sum(abs(counts.get(k, 0) / runs - p) for k, p in exact.items()) / 2
    # the expected distance of an exact sampler's histogram, with a margin of 3 standard errors
    bound = sum(np.sqrt(p * (1 - p) / runs) for p in exact.values()) * 0.8 / 2 + 0.03
    assert tv < bound, (tv, bound)


def test_drafter_checkpoint_round_trip_and_refusals(tmp_path, tiny, backend, tiny_models):
    from safetensors import safe_open

    from xqchat.models import XQError

    model = tiny["qwen2"]
    config = DrafterConfig(dim=model.spec.dim, blocks=1, target=target_key(model.spec))
    if backend == "torch":
        import torch

        from xqchat.backends.cuda.drafter import RecurrentDrafter

        torch.manual_seed(0)
        RecurrentDrafter(config).save(tmp_path / "d")
    else:
        from xqchat.backends.mlx.drafter import RecurrentDrafter

        on_engine(lambda: RecurrentDrafter(config).save(tmp_path / "d"))
    with safe_open(tmp_path / "d" / WEIGHTS, "np") as f:  # stored in fp16, the vocabulary as ids
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16", "int64"}  # noqa: SIM118
    engine = load_model(
        resolve(str(tiny_models["qwen2"])),
        EngineOptions(backend=backend, weights="fp32", drafter=str(tmp_path / "d")),
    )
    assert engine.drafter is not None and engine.beams == (1, 4)  # the defaults
    session = engine.new_session()
    session.prefill([1, 2, 3])
    beams = on_engine(lambda: engine.drafter.draft(session._next_hidden, 11, 3, 5))
    assert beams.shape == (3, 5) and (beams[:, 0] == 11).all()
    assert len({tuple(b) for b in beams}) == 3  # distinct beams, best first
    with pytest.raises(XQError, match="trained for another model"):
        load_model(
            resolve(str(tiny_models["gqa-qwen2"])),
            EngineOptions(backend=backend, drafter=str(tmp_path / "d")),
        )
    with pytest.raises(XQError, match="no drafter at"):
        load_model(
            resolve(str(tiny_models["qwen2"])),
            EngineOptions(backend=backend, drafter=str(tmp_path / "none")),
        )


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # a tied table, an untied LM head
def test_the_drafters_cut_head_holds_the_models_values_in_every_weight_format(
    tmp_path, backend, tiny_models, arch
):
    """The draft vocabulary's rows of the LM head, dequantized where the model holds int8 codes
    (and packed in bf16 on a CPU): the drafter's logits agree with fp32's."""
    files = resolve(str(tiny_models[arch]))
    spec = load_model(files, EngineOptions(backend=backend, weights="fp32")).spec
    config = DrafterConfig(spec.dim, 1, draft_vocab=40, target=target_key(spec))
    if backend == "torch":
        import torch

        from xqchat.backends.cuda.drafter import RecurrentDrafter

        torch.manual_seed(0)
        net = RecurrentDrafter(config)
        net.vocab.copy_(torch.arange(100, 140))
        net.save(tmp_path)
        features = torch.randn(3, spec.dim).to("cuda" if torch.cuda.is_available() else "cpu")
    else:
        import mlx.core as mx

        from xqchat.backends.mlx.drafter import RecurrentDrafter

        def make():
            net = RecurrentDrafter(config)
            net.vocab = mx.arange(100, 140, dtype=mx.int64)
            net.save(tmp_path)

        on_engine(make)
        features = on_engine(lambda: mx.random.normal((3, spec.dim), key=mx.random.key(0)))
    logits = {}
    for weights in ("fp32", "bf16", "int8"):
        model = load_model(
            files, EngineOptions(backend=backend, weights=weights, drafter=str(tmp_path))
        )
        logits[weights] = to_numpy(on_engine(lambda m=model: m.drafter.logits(features)))
    scale = np.abs(logits["fp32"]).max()
    for weights in ("bf16", "int8"):
        np.testing.assert_allclose(logits[weights], logits["fp32"], atol=0.03 * scale)


def test_int8_greedy_text_equals_plain_decoding(backend, tiny_models):
    """With int8 weights a tree's rows quantize as decode steps do (each row's outliers its own:
    backends/int8.py), so the oracle's trees keep plain greedy's text exactly. The thresholds
    threshold is low enough that some rows of each tree have outliers and others not (under
    LLM.int8's union of the rows' outlier columns this text differed, at 1 and at 2)."""
    model = load_model(
        resolve(str(tiny_models["qwen2"])),
        EngineOptions(backend=backend, weights="int8", int8_threshold=1.0, drafter="none"),
    )
    cfg = GenerationConfig(max_tokens=40)
    for seed, prompt in enumerate(PROMPTS):
        _, expected = plain_run(model, CacheSpec(), prompt, cfg)
        session = model.new_session(CacheSpec())
        oracle(model, session, knows(prompt + expected), seed=seed)
        session.prefill(prompt)
        events = list(session.generate(cfg))
        model.drafter = None
        assert [e.token for e in events] == expected
        assert events[-1].accepted_per_step > 1.5
