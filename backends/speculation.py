"""Speculation that pays: which tree to verify next, chosen by measuring this machine and text.

Before each step the session asks `choose()` for a Shape (drafter beams, their length, lookup's
length; PLAIN for none), and afterwards tells the policy what the step cost and, for a tree, which
of its nodes were accepted. The policy keeps, exponentially weighted:

- the seconds of a plain step, of the drafter per beam-search step (by width), and of a tree of n
  rows (lookup, packing, verification, acceptance: everything but the drafter);
- for every shape no larger than a tree it verified, the rows that shape's tree would have had
  and the tokens it would have decided. One verified tree answers this for all its sub-shapes at
  once: each beam of a smaller shape is a prefix of one of the tree's beams (the drafter's best
  beams first, lookup's last), and the accepted path says how much of each prefix was right.

It picks the shape with the most expected tokens per second, decided / (draft + tree time), plain
decoding (1 token per plain step) included. To re-decide as the context grows and acceptance
moves, every `explore_every` steps it runs the other arm: the largest tree (which refreshes every
sub-shape's acceptance) or a plain step (its cost). While plain decoding keeps winning, the largest
tree is tried ever more rarely (the interval doubles up to `MAX_EXPLORE_EVERY`), so a tree that
costs three plain steps takes under 2% of the time it saves nothing on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EXPLORE_EVERY = 16  # steps between exploration steps after the choice changed
MAX_EXPLORE_EVERY = 256
WEIGHT = 1 / 16  # of a new observation in the running averages (after the first 16)


@dataclass(frozen=True)
class Shape:
    """A step's tree: `width` drafter beams of `length` tokens (the target's own next token
    included; length 1: no drafter beam) and prompt lookup's beam of up to `lookup` tokens."""

    width: int = 0
    length: int = 1
    lookup: int = 0

    @property
    def drafts(self) -> bool:
        return self.width > 0 and self.length > 1

    @property
    def drafter(self) -> tuple[int, int]:
        return self.width, self.length

    @property
    def plain(self) -> bool:
        return not self.drafts and self.lookup == 0

    def __le__(self, other: Shape) -> bool:
        """Whether this shape's tree is part of `other`'s (each of its beams a prefix of one)."""
        drafter = not self.drafts or (self.width <= other.width and self.length <= other.length)
        return drafter and self.lookup <= other.lookup

    def __str__(self) -> str:
        if self.plain:
            return "plain"
        parts = [f"{self.width}x{self.length}"] if self.drafts else []
        return " + ".join(parts + ([f"lookup {self.lookup}"] if self.lookup else []))


PLAIN = Shape()


class Average:
    """An exponentially weighted mean that starts as the plain mean of its first observations."""

    def __init__(self) -> None:
        self.value, self.count = 0.0, 0

    def add(self, x: float) -> None:
        self.count += 1
        self.value += (x - self.value) * max(WEIGHT, 1 / self.count)


class SpeculationPolicy:
    """Chooses each step's tree, up to `largest`, by expected tokens per second. `drafter`: a
    drafter network is bound (else lookup's beam is the only tree). `clock`: seconds, injectable
    so tests drive the decisions deterministically."""

    def __init__(
        self,
        largest: Shape,
        drafter: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        explore_every: int = EXPLORE_EVERY,
    ):
        self.clock = clock
        widths = range(1, largest.width + 1) if drafter and largest.drafts else ()
        # (width, length) of the drafter's part of a tree; (0, 1): none
        self.drafter_parts = [(0, 1), *itertools.product(widths, range(2, largest.length + 1))]
        self.lookups = np.arange(largest.lookup + 1)
        # every (drafter part, lookup length), as a (parts, lookups) grid flattened: PLAIN first
        self.shapes = [
            Shape(w, n, int(k)) for (w, n), k in itertools.product(self.drafter_parts, self.lookups)
        ]
        self.largest = self.shapes[-1]
        n = len(self.shapes)
        # had each shape been chosen: its tree's rows and the tokens it decides per step (means)
        self.rows, self.decided, self.seen = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
        self.plain_s = Average()
        self.draft_s: dict[int, Average] = {}  # by width: seconds per beam-search step
        self.tree_s: dict[int, Average] = {}  # by rows
        self.explore_every = self.base_interval = explore_every
        self.steps = 0
        self.best = self.largest  # optimistic until measured
        self.explored_plain = False  # the last exploration step was plain: the tree is next
        # (tokens/s of the best tree, of plain decoding) as measured so far, once both are known
        self.estimate: tuple[float, float] | None = None

    # -- what the session asks -----------------------------------------------------------------
    def choose(self) -> Shape:
        """The shape of the next step."""
        self.steps += 1
        if self.plain_s.count == 0 and self.seen[-1]:
            return PLAIN  # the second step: plain's cost, to compare the first tree with
        if self.steps % self.explore_every:
            return self.best
        if self.best.plain:
            return self.largest
        if self.best == self.largest:
            return PLAIN
        self.explored_plain = not self.explored_plain  # a smaller tree: both arms in turn
        return PLAIN if self.explored_plain else self.largest

    def record_plain(self, seconds: float) -> None:
        self.plain_s.add(seconds)
        self._decide()

    def record_tree(
        self,
        shape: Shape,
        beam_nodes: np.ndarray,
        drafter_beams: int,
        accepted: list[int],
        draft_seconds: float,
        tree_seconds: float,
    ) -> None:
        """A verified tree of `shape`: `beam_nodes` (M, L) its beams' nodes (-1 past a beam's end
        or where it was pruned), the first `drafter_beams` the drafter's best first, then lookup's
        if it found one; `accepted` the nodes of the accepted path, root first. A tree of one row
        (no drafter, and lookup found nothing) was verified as a plain step, and counts as one."""
        if shape.drafts:
            draft = self.draft_s.setdefault(shape.width, Average())
            draft.add(draft_seconds / (shape.length - 1))
        rows = int(beam_nodes.max()) + 1  # every node is on some beam
        cost = self.plain_s if rows == 1 else self.tree_s.setdefault(rows, Average())
        cost.add(tree_seconds)
        right = (beam_nodes[..., None] == np.array(accepted)).any(-1)
        lead = np.cumprod(right, axis=1).sum(axis=1)  # (M,) each beam's accepted prefix, root on
        if len(beam_nodes) > drafter_beams:  # lookup's beam: a chain from the root
            chain = beam_nodes[drafter_beams][beam_nodes[drafter_beams] >= 0].tolist()
            looked_right = int(lead[drafter_beams])
        else:
            chain, looked_right = [0], 1
        # per drafter part: its nodes, its tokens decided, and how far lookup's chain runs in it
        part_rows, ahead, shared, within = [], [], [], []
        for width, length in self.drafter_parts:
            nodes = beam_nodes[:width, :length] if width else beam_nodes[:1, :1]
            drafted = set(nodes[nodes >= 0].tolist())
            part_rows.append(len(drafted))
            ahead.append(int(np.minimum(lead[:width], length).max()) if width else 1)
            shared.append(next((i for i, n in enumerate(chain) if n not in drafted), len(chain)))
            within.append(Shape(width, length) <= shape)
        looked = np.minimum(len(chain), self.lookups + 1)  # (lookups,) lookup's rows, root on
        shared = np.array(shared)[:, None]
        grid_rows = np.array(part_rows)[:, None] + looked - np.minimum(shared, looked)
        # the accepted tokens past the root, plus the next token
        grid_decided = np.maximum(np.array(ahead)[:, None], np.minimum(looked_right, looked))
        observed = (np.array(within)[:, None] & (self.lookups <= shape.lookup)).ravel()
        self.seen += observed
        weight = np.where(observed, np.maximum(WEIGHT, 1 / np.maximum(self.seen, 1)), 0.0)
        self.rows += (grid_rows.ravel() - self.rows) * weight
        self.decided += (grid_decided.ravel() - self.decided) * weight
        self._decide()

    def expected(self, shape: Shape) -> tuple[float, float]:
        """(rows, tokens decided) per step of `shape` as measured so far."""
        i = self.shapes.index(shape)
        return float(self.rows[i]), float(self.decided[i])

    def rates(self) -> np.ndarray:
        """Expected tokens per second of each shape (self.shapes' order), 0 where its cost or
        yield is not known yet."""
        if self.plain_s.count == 0:
            return np.zeros(len(self.shapes))
        # a tree's seconds by its rows, interpolated between the row counts measured (a mean of
        # rows is fractional); one row is a plain step (nothing drafted, nothing found)
        known = {1: self.plain_s.value} | {n: a.value for n, a in self.tree_s.items() if n > 1}
        xs = sorted(known)
        seconds = np.interp(self.rows, xs, [known[x] for x in xs])
        for i, (width, length) in enumerate(self.drafter_parts[1:], 1):
            per_step = self.draft_s.get(width) or self.draft_s.get(self.largest.width)
            draft = per_step.value * (length - 1) if per_step else np.inf
            seconds[i * len(self.lookups) : (i + 1) * len(self.lookups)] += draft
        rates = np.where(self.seen > 0, self.decided / seconds, 0.0)
        rates[0] = 1 / self.plain_s.value
        return rates

    def _decide(self) -> None:
        rates = self.rates()
        if not rates[0] or not rates[1:].any():  # plain's and a tree's both needed
            return
        best = self.shapes[int(rates.argmax())]
        self.estimate = (float(rates[1:].max()), float(rates[0]))
        if best != self.best:
            self.best, self.explore_every = best, self.base_interval
        elif self.steps % self.explore_every == 0 and self.best.plain:
            self.explore_every = min(2 * self.explore_every, MAX_EXPLORE_EVERY)
