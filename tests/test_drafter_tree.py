"""The drafter's framework-free half: beams -> prefix tree, its mask and positions, acceptance."""

import numpy as np
import pytest

from xqchat.backends.drafter import (
    accept_greedy,
    accept_sampled,
    build_tree,
    lookup,
    processed_probs,
)


def test_shared_prefixes_are_packed_once_breadth_first():
    beams = np.array([[7, 1, 2, 3], [7, 1, 2, 4], [7, 5, 2, 3]])
    tree = build_tree(beams)
    #        7
    #      1   5
    #      2   2
    #    3   4   3
    assert tree.tokens.tolist() == [7, 1, 5, 2, 2, 3, 4, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 3, 3, 4]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    assert tree.beam_nodes.tolist() == [[0, 1, 3, 5], [0, 1, 3, 6], [0, 2, 4, 7]]
    for b in range(3):  # each beam reads back from its nodes
        assert tree.tokens[tree.beam_nodes[b]].tolist() == beams[b].tolist()
        assert tree.path(int(tree.beam_nodes[b, -1])) == tree.beam_nodes[b].tolist()
    mask = tree.mask()
    assert mask[6].nonzero()[0].tolist() == [0, 1, 3, 6]  # itself and its ancestors
    assert mask[7].nonzero()[0].tolist() == [0, 2, 4, 7]
    assert mask[0].nonzero()[0].tolist() == [0]
    assert mask.sum() == sum(d + 1 for d in tree.depths)


def test_fully_shared_beams_are_one_chain():
    tree = build_tree(np.array([[3, 9, 9, 4]] * 5))
    assert tree.tokens.tolist() == [3, 9, 9, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.depths.tolist() == [0, 1, 2, 3]
    assert (tree.beam_nodes == np.arange(4)).all()
    assert (tree.mask() == np.tri(4, dtype=bool)).all()  # a chain is plain causal attention


def test_fully_distinct_beams_share_only_the_root():
    beams = np.array([[0, 10, 11], [0, 20, 21], [0, 30, 31]])
    tree = build_tree(beams)
    assert len(tree) == 1 + 3 * 2
    assert tree.tokens.tolist() == [0, 10, 20, 30, 11, 21, 31]
    assert tree.depths.tolist() == [0, 1, 1, 1, 2, 2, 2]
    mask = tree.mask()
    assert mask[4].nonzero()[0].tolist() == [0, 1, 4]
    assert not mask[1:4, 1:4][~np.eye(3, dtype=bool)].any()  # siblings never see each other


def test_distinct_first_tokens_make_a_forest():
    tree = build_tree(np.array([[1, 2], [3, 2]]))
    assert tree.parents.tolist() == [-1, -1, 0, 1]
    assert tree.mask()[3].nonzero()[0].tolist() == [1, 3]


def test_prune_keeps_a_tree_and_cuts_the_beams():
    tree = build_tree(np.array([[7, 1, 2, 3], [7, 1, 2, 4], [7, 5, 2, 3]])).prune(5)
    assert tree.tokens.tolist() == [7, 1, 5, 2, 2]
    assert tree.beam_nodes.tolist() == [[0, 1, 3, -1], [0, 1, 3, -1], [0, 2, 4, -1]]


def test_beams_of_different_lengths_share_their_prefixes():
    """A prompt-lookup beam runs deeper than the drafter's and may share its first tokens."""
    tree = build_tree([[7, 1, 2, 3], [7, 5, 2, 3], [7, 1, 2, 8, 8, 9]])
    assert tree.tokens.tolist() == [7, 1, 5, 2, 2, 3, 3, 8, 8, 9]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 3, 3, 4, 5]
    assert tree.beam_nodes.tolist() == [
        [0, 1, 3, 5, -1, -1],
        [0, 2, 4, 6, -1, -1],
        [0, 1, 3, 7, 8, 9],
    ]
    assert tree.path(9) == [0, 1, 3, 7, 8, 9]
    assert accept_greedy(tree, np.array([1, 2, 0, 8, 0, 0, 0, 8, 9, 4])) == [0, 1, 3, 7, 8, 9]
    assert tree.prune(7).beam_nodes.tolist() == [
        [0, 1, 3, 5, -1, -1],
        [0, 2, 4, 6, -1, -1],
        [0, 1, 3, -1, -1, -1],
    ]


def test_lookup_proposes_what_followed_the_latest_longest_match():
    # the last 3 tokens (1, 2, 3) occurred twice: the later occurrence's continuation wins
    assert lookup([1, 2, 3, 4, 5, 9, 1, 2, 3, 6, 7, 1, 2, 3], 2) == [6, 7]
    # a 3-token match beats a later 2-token one; no 3-token match falls back to 2, then to 1
    assert lookup([5, 2, 3, 9, 9, 1, 2, 3, 4, 8, 5, 2, 3], 3) == [9, 9, 1]
    assert lookup([2, 3, 4, 7, 2, 3], 4) == [4, 7, 2, 3]
    assert lookup([3, 5, 6, 1, 3], 2) == [5, 6]
    # the continuation stops at the end of the context; nothing found, nothing proposed
    assert lookup([4, 4, 4], 5) == [4]
    assert lookup([1, 2, 3], 4) == [] and lookup([1], 4) == [] and lookup([], 4) == []


def test_greedy_acceptance_follows_the_target_argmax():
    tree = build_tree(np.array([[7, 1, 2, 3], [7, 1, 2, 4], [7, 5, 2, 3]]))
    # after node: 0 -> 5 (second branch), 2 -> 2, 4 -> 9 (no child is 9): path 0, 2, 4
    argmax = np.array([5, 0, 2, 0, 9, 0, 0, 0])
    assert accept_greedy(tree, argmax) == [0, 2, 4]
    assert accept_greedy(tree, np.array([8, 0, 0, 0, 0, 0, 0, 0])) == [0]  # only the root
    everything = np.array([1, 2, 0, 4, 0, 0, 0, 0])
    assert accept_greedy(tree, everything) == [0, 1, 3, 6]  # a whole beam


def test_processed_probs_match_nucleus_sampling():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.allclose(processed_probs(logits, 1.0, 1.0), [0.5, 0.3, 0.15, 0.05])
    assert np.allclose(processed_probs(logits, 1.0, 0.75), [0.625, 0.375, 0, 0])
    assert np.allclose(processed_probs(logits, 1.0, 0.81), [0.5, 0.3, 0.15, 0] / np.float64(0.95))
    assert np.allclose(processed_probs(logits, 1.0, 0.1), [1, 0, 0, 0])  # always the top one
    sharp = processed_probs(logits, 0.5, 1.0)
    assert np.allclose(sharp, np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365)


@pytest.mark.parametrize("beams", [[[0, 1, 2], [0, 1, 3], [0, 2, 1]], [[0, 3, 3]], [[0, 1, 1]] * 3])
def test_sampled_acceptance_keeps_the_target_distribution(beams):
    """Over 4 tokens, a target whose next-token distribution depends on the last token: the
    tokens the walk emits (path after the root, then the next token) must be distributed as
    sampling from the target token by token, whatever the drafter proposed."""
    table = np.array(
        [[0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.7, 0.0, 0.3]]
    )
    tree = build_tree(np.array(beams))
    rng = np.random.default_rng(0)
    n = 40_000
    first = np.zeros(4)
    second = np.zeros((4, 4))  # after a first token the walk accepted: the walk goes on exactly
    for _ in range(n):
        path, nxt = accept_sampled(
            tree, lambda node: table[tree.tokens[node]], lambda d: rng.random()
        )
        emitted = [*tree.tokens[path[1:]].tolist(), nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[0], emitted[1]] += 1
    root = beams[0][0]
    assert np.abs(first / n - table[root]).sum() / 2 < 0.012  # total variation
    # drafts were accepted often enough to test what follows (p = 0.1 at least: [0, 3, 3] is
    # accepted one time in ten, so n / 10 itself would fail for half of the seeds)
    assert second.sum() > n / 12
    for a in np.flatnonzero(second.sum(axis=1) > 1000):
        assert np.abs(second[a] / second[a].sum() - table[a]).sum() / 2 < 0.04, a
