"""The adaptive speculation policy (backends/speculation.py): which tree it settles on when steps
cost what a fake clock says and drafts are right as often as a script says. Decisions only, never
timing; then the same through a real session of a tiny model."""

import numpy as np
import pytest

from xqchat.backends.base import EngineOptions, GenerationConfig, load_model
from xqchat.backends.drafter import build_tree
from xqchat.backends.speculation import PLAIN, Shape, SpeculationPolicy
from xqchat.models import resolve

LARGEST = Shape(1, 4, 7)


def run(policy, steps, plain_s, row_s, draft_s, right, start=0):
    """`steps` steps of `policy`: a plain step costs plain_s; a tree plain_s + row_s per row past
    the first, and the drafter draft_s per beam-search step; right(shape) -> (drafted tokens
    right on the best drafter beam, lookup's tokens right). Returns the shapes chosen."""
    chosen = []
    for i in range(start, start + steps):
        shape = policy.choose()
        chosen.append(shape)
        if shape.plain:
            policy.record_plain(plain_s)
            continue
        drafter_right, lookup_right = right(shape, i)
        beams = [[0, *range(10 * b + 1, 10 * b + shape.length)] for b in range(shape.width)]
        beams = beams if shape.drafts else [[0]]
        drafter_beams = len(beams)
        if shape.lookup:
            beams.append([0, *range(100, 100 + shape.lookup)])
        tree = build_tree(beams)
        if shape.lookup and lookup_right > min(drafter_right, shape.length - 1):
            path = tree.beam_nodes[drafter_beams, : 1 + min(lookup_right, shape.lookup)]
        else:
            path = tree.beam_nodes[0, : 1 + min(drafter_right, shape.length - 1)]
        draft = draft_s * (shape.length - 1) if shape.drafts else 0.0
        tree_s = plain_s + row_s * (len(tree) - 1)
        policy.record_tree(shape, tree.beam_nodes, drafter_beams, path.tolist(), draft, tree_s)
    return chosen


def test_sub_shapes_are_scored_from_one_tree():
    """One verified tree of the largest shape tells every smaller shape's rows and yield."""
    policy = SpeculationPolicy(Shape(2, 3, 2))
    beams = [[0, 1, 2], [0, 5, 6], [0, 1, 9]]  # two drafter beams, then lookup's
    tree = build_tree(beams)
    path = tree.beam_nodes[0].tolist()  # the best drafter beam all right
    policy.record_tree(Shape(2, 3, 2), tree.beam_nodes, 2, path, 0.0, 1.0)
    cases = {  # shape: (rows, decided)
        Shape(2, 3, 2): (6, 3),
        Shape(1, 3, 0): (3, 3),
        Shape(1, 2, 0): (2, 2),
        Shape(2, 2, 0): (3, 2),
        Shape(0, 1, 2): (3, 2),  # lookup alone: [0, 1, 9], its first token right
        Shape(0, 1, 1): (2, 2),
        Shape(1, 2, 2): (3, 2),  # lookup shares node 1 with the drafter's beam
        Shape(2, 2, 1): (3, 2),
        PLAIN: (1, 1),
    }
    for shape, (rows, decided) in cases.items():
        assert policy.expected(shape) == (rows, decided), shape
    assert Shape(1, 3, 2) <= Shape(2, 3, 2) and not Shape(1, 4, 0) <= Shape(2, 3, 2)


def test_trees_that_cost_more_than_they_yield_settle_on_plain_decoding():
    policy = SpeculationPolicy(LARGEST)
    # the first drafted token is right, lookup never is; a drafted token costs 0.6 plain steps
    # to draft and 0.6 to verify: the best tree, one drafted token, takes 2.2 steps for 2 tokens
    chosen = run(policy, 600, 1.0, 0.6, 0.6, lambda shape, i: (1, 0))
    assert policy.best == PLAIN
    late = chosen[100:]
    trees = sum(not s.plain for s in late)
    assert 1 <= trees <= len(late) // 60  # still explored, ever more rarely
    fast, slow = policy.estimate
    assert fast < slow == 1.0


def test_cheap_trees_with_high_acceptance_keep_the_largest_tree():
    policy = SpeculationPolicy(LARGEST)
    # every other step the drafter is right, every other step lookup: both beams pay
    chosen = run(policy, 200, 1.0, 0.02, 0.01, lambda shape, i: (3, 0) if i % 2 else (0, 7))
    assert policy.best == LARGEST
    assert sum(s == LARGEST for s in chosen[20:]) >= 0.9 * 180
    assert sum(s.plain for s in chosen[20:]) >= 1  # plain's cost is still checked now and then
    fast, slow = policy.estimate
    assert fast > 3 * slow


def test_rows_that_are_not_accepted_are_cut():
    """Only the first drafted token is ever right and lookup never is: a drafter beam of 2
    and no lookup pays most when each row costs a fifth of a plain step."""
    policy = SpeculationPolicy(LARGEST)
    run(policy, 300, 1.0, 0.2, 0.02, lambda shape, i: (1, 0))
    assert policy.best == Shape(1, 2, 0)


def test_repetitive_text_takes_lookup_alone_when_the_drafter_is_wrong():
    policy = SpeculationPolicy(LARGEST)
    run(policy, 300, 1.0, 0.05, 0.2, lambda shape, i: (0, 7))
    assert policy.best == Shape(0, 1, 7)


def test_it_re_decides_when_acceptance_falls():
    policy = SpeculationPolicy(LARGEST)
    run(policy, 100, 1.0, 0.1, 0.05, lambda shape, i: (3, 3))
    assert not policy.best.plain
    chosen = run(policy, 300, 1.0, 0.1, 0.05, lambda shape, i: (0, 0), start=100)
    assert policy.best == PLAIN
    switched = next(
        i for i, s in enumerate(chosen) if s.plain and all(c.plain for c in chosen[i : i + 10])
    )
    assert switched < 100


def test_without_a_drafter_only_lookup_shapes_are_candidates():
    policy = SpeculationPolicy(LARGEST, drafter=False)
    assert policy.largest == Shape(0, 1, 7)
    assert {s.drafts for s in policy.shapes} == {False}
    assert len(policy.shapes) == 8  # lookup 0 (plain) to 7


class Clock:
    """Seconds as the patched model work says they pass."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def timed(session, clock, plain_s, row_s):
    """Make `session`'s forwards advance `clock`: a one-token forward plain_s, a tree plain_s +
    row_s per row past the first."""
    forward, verify = session._forward, session._verify

    def timed_forward(tokens, all_logits=False):
        clock.now += plain_s
        return forward(tokens, all_logits)

    def timed_verify(tree, start):
        clock.now += plain_s + row_s * (len(tree) - 1)
        return verify(tree, start)

    session._forward, session._verify = timed_forward, timed_verify


@pytest.fixture(scope="module")
def lookup_model(backend, tiny_models):
    return load_model(
        resolve(str(tiny_models["qwen2"])),
        EngineOptions(backend=backend, weights="fp32", drafter="lookup", lookup=6),
    )


PROMPT = [5, 9, 77, 1000, 42] * 3  # repeats itself, and a random model's reply soon does


def reply(model, row_s, temperature):
    """A reply of 64 tokens with a fresh policy, the forwards timed by a fake clock: a plain step
    1 second, a tree 1 + row_s per row past the first. Returns (tokens, last event, policy)."""
    clock = Clock()
    policy = model.speculation = SpeculationPolicy(Shape(0, 1, 6), drafter=False, clock=clock)
    session = model.new_session()
    timed(session, clock, 1.0, row_s)
    session.prefill(PROMPT)
    cfg = GenerationConfig(max_tokens=64, temperature=temperature, seed=11)
    events = list(session.generate(cfg))
    return [e.token for e in events], events[-1], policy


def test_a_session_follows_the_policy_and_keeps_plain_decodings_text(lookup_model):
    """Prompt lookup on a repetitive prompt: with trees that cost more than they yield the session
    settles on plain steps, with cheap ones it keeps verifying trees; greedy text is plain
    decoding's either way, and a seeded sample is the same reply whatever the trees were."""
    model = lookup_model
    slow, slow_end, slow_policy = reply(model, 2.0, 0.0)
    fast, fast_end, fast_policy = reply(model, 0.01, 0.0)
    assert slow_policy.best == PLAIN and slow_end.speculation[0] < slow_end.speculation[1]
    assert fast_policy.best != PLAIN and fast_end.speculation[0] > fast_end.speculation[1]
    assert slow_end.accepted_per_step < 1.1 < 1.25 < fast_end.accepted_per_step
    drafter, model.drafter = model.drafter, None
    try:
        session = model.new_session()
        session.prefill(PROMPT)
        plain = [e.token for e in session.generate(GenerationConfig(max_tokens=64))]
    finally:
        model.drafter = drafter
    assert slow == fast == plain
    # (a random model's distributions are nearly flat: a low temperature lets lookup hit)
    sampled_slow, _, _ = reply(model, 2.0, 0.05)
    sampled_fast, end, _ = reply(model, 0.01, 0.05)
    assert sampled_slow == sampled_fast != plain and end.accepted_per_step > 1.1


def test_draw_inverts_the_cumulative_distribution():
    from xqchat.backends.drafter import draw

    p = np.array([0.0, 0.5, 0.0, 0.25, 0.25])
    assert [draw(p, u) for u in (0.0, 0.49, 0.5, 0.74, 0.75, 0.999)] == [1, 1, 3, 3, 4, 4]
