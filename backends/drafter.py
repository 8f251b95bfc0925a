"""Recurrent-drafter speculation, the framework-free half (Cheng, Zhang et al., "Recurrent
Drafter for Fast Speculative Decoding", arXiv 2403.09919): the drafter's beams become a prefix
tree that one target forward verifies, and the target's logits at the tree's nodes decide how much
of it to keep.

The tree's nodes are the distinct prefixes of the beams, packed parent-before-child (breadth
first), so the packed tokens feed the target as one sequence: node i attends to the cache and to
its ancestors (`mask`) at position start + depth (`depths`). The beams all begin with the token the
target itself chose last, so the tree has one root.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xqchat.models.errors import XQError
from xqchat.models.paths import derived_dir
from xqchat.models.registry import ModelFiles
from xqchat.models.spec import ModelSpec


@dataclass(frozen=True)
class Tree:
    tokens: np.ndarray  # (N,) the distinct prefixes' last tokens, parents before children
    parents: np.ndarray  # (N,) index of each node's parent; -1 for the root(s)
    depths: np.ndarray  # (N,) 0 for a root
    beam_nodes: np.ndarray  # (M, L) the node each beam's k-th token became

    def __len__(self) -> int:
        return len(self.tokens)

    def mask(self) -> np.ndarray:
        """(N, N) bool: node i sees node j when j is i or one of its ancestors."""
        n = len(self)
        seen = np.eye(n, dtype=bool)
        for i in range(n):  # parents come first, so their rows are complete already
            if self.parents[i] >= 0:
                seen[i] |= seen[self.parents[i]]
        return seen

    def children(self, node: int) -> np.ndarray:
        """The children of `node` (-1: the roots), in packing order."""
        return np.flatnonzero(self.parents == node)

    def path(self, node: int) -> list[int]:
        """The nodes from the root down to `node`, inclusive."""
        nodes = []
        while node >= 0:
            nodes.append(node)
            node = int(self.parents[node])
        return nodes[::-1]

    def prune(self, n: int) -> Tree:
        """The first n nodes: still a tree, since parents come before children. Beams are cut
        where they leave it."""
        keep = self.beam_nodes < n
        cut = np.where(np.cumprod(keep, axis=1).astype(bool), self.beam_nodes, -1)
        return Tree(self.tokens[:n], self.parents[:n], self.depths[:n], cut)


def build_tree(beams) -> Tree:
    """Beams (token id sequences of any lengths, each beginning with the root token) -> the prefix
    tree of their distinct prefixes, breadth first. beam_nodes is (M, longest beam), -1 past a
    beam's end."""
    beams = [[int(t) for t in beam] for beam in beams]
    length = max(map(len, beams))
    tokens, parents, depths = [], [], []
    beam_nodes = np.full((len(beams), length), -1, dtype=np.int64)
    for depth in range(length):
        seen: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for b, beam in enumerate(beams):
            if depth >= len(beam):
                continue
            parent = int(beam_nodes[b, depth - 1]) if depth else -1
            key = (parent, beam[depth])
            if key not in seen:
                seen[key] = len(tokens)
                tokens.append(key[1])
                parents.append(parent)
                depths.append(depth)
            beam_nodes[b, depth] = seen[key]
    return Tree(
        np.array(tokens, dtype=np.int64),
        np.array(parents, dtype=np.int64),
        np.array(depths, dtype=np.int64),
        beam_nodes,
    )


class LookupOnly:
    """`--drafter lookup`: no drafter network, so any model speculates without training; each
    step's tree is the target's own token and prompt lookup's beam."""

    def draft(self, hidden, token: int, width: int, length: int) -> np.ndarray:
        return np.array([[token]])


LOOKUP_NGRAMS = (3, 2, 1)  # the context's last n tokens to look for, longest first


def lookup(context, length: int) -> list[int]:
    """Prompt lookup: the up to `length` tokens that followed the latest earlier occurrence of
    the context's last 3 tokens (else its last 2, else its last one); [] when there is none.
    Replies repeat names, phrases and lines of the prompt and of themselves, and a small model
    repeats itself a great deal: beside the drafter's beam it costs no model work, only tree
    rows (README: MT-Bench 1.64 -> 1.97 tokens/step for the default model)."""
    a = np.asarray(context)
    for n in LOOKUP_NGRAMS:
        if len(a) <= n:
            continue
        # hits[i]: a[i : i + n] equals the last n tokens, for every i a token follows
        hits = np.ones(len(a) - n, dtype=bool)
        for k in range(n):
            hits &= a[k : len(a) - n + k] == a[len(a) - n + k]
        found = np.flatnonzero(hits)
        if len(found):
            after = int(found[-1]) + n
            return a[after : after + length].tolist()
    return []


def accept_greedy(tree: Tree, argmax: np.ndarray) -> list[int]:
    """The longest root-to-node path whose every token is the target's argmax after its parent.
    argmax (N,): the target's choice after each node. The root is the target's own choice and
    always kept. Returns the path's nodes; the next token is argmax[path[-1]]."""
    _check_one_root(tree)
    node = 0
    while True:
        match = [c for c in tree.children(node) if tree.tokens[c] == argmax[node]]
        if not match:
            return tree.path(node)
        node = int(match[0])


def accept_sampled(tree: Tree, probs, uniform) -> tuple[list[int], int]:
    """Walk the tree from the root, keeping the target's distribution exactly. At a node whose
    target distribution is p = probs(node) (temperature and top-p applied), the target draws its
    own next token from p with the uniform `uniform(depth of node)` (`draw`); the walk moves to
    the child holding that token, and stops at a node with none, the drawn token being the next
    one. Every token is the target's own draw, so replies are distributed as plain sampling's;
    a child is kept with probability p(child), as often as testing each child in turn keeps one;
    and with the same uniforms the same tokens come out whatever the tree held. Returns (path
    nodes, the next token)."""
    _check_one_root(tree)
    node = 0
    while True:
        token = draw(np.asarray(probs(node), dtype=np.float64), uniform(int(tree.depths[node])))
        match = [c for c in tree.children(node) if tree.tokens[c] == token]
        if not match:
            return tree.path(node), token
        node = int(match[0])


def draw(p: np.ndarray, u: float) -> int:
    """The token whose span of the cumulative distribution p holds u * p.sum() (u in [0, 1))."""
    cumulative = np.cumsum(p, dtype=np.float64)
    return int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))


def _check_one_root(tree: Tree) -> None:
    if (tree.parents < 0).sum() != 1:
        raise ValueError("acceptance needs beams that all begin with the target's own token")


def processed_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The distribution the plain sampler draws from: softmax(logits / T), then the smallest set
    of most likely tokens whose mass reaches top_p (always at least the top one)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        outside = np.cumsum(sorted_p) - sorted_p >= top_p
        p[order[outside]] = 0.0
        p /= p.sum()
    return p


WEIGHTS, CONFIG = "drafter.safetensors", "drafter.json"


@dataclass(frozen=True)
class DrafterConfig:
    """A drafter's shape and the target it was trained for (checked when it is loaded)."""

    dim: int  # the target's hidden width: its embeddings, final hidden states and LM head
    blocks: int = 2  # residual SiLU blocks over [h ; s]
    draft_vocab: int = 0  # the target's most frequent output tokens it may propose (0 = all)
    target: dict = field(default_factory=dict)  # arch, n_layers, dim, vocab_size of the target

    @classmethod
    def read(cls, folder: Path) -> DrafterConfig:
        try:
            return cls(**json.loads((Path(folder) / CONFIG).read_text()))
        except FileNotFoundError:
            raise XQError(f"no drafter at {folder} (expected {CONFIG} and {WEIGHTS})") from None
        except (ValueError, TypeError):
            raise XQError(f"{Path(folder) / CONFIG} is not a drafter config") from None

    def write(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CONFIG).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    def check(self, spec: ModelSpec, folder) -> None:
        if self.target != target_key(spec):
            t = self.target
            raise XQError(
                f"the drafter at {folder} was trained for another model ({t.get('arch')}, "
                f"{t.get('n_layers')} layers, {t.get('dim')}-dim); train one for this model "
                "with `xqchat train-drafter`"
            )


def target_key(spec: ModelSpec) -> dict:
    return {"arch": spec.arch, "n_layers": spec.n_layers, "dim": spec.dim, "vocab": spec.vocab_size}


SHIPPED = Path(__file__).parent / "drafters"  # trained drafters that come with xqchat, by model


def drafter_folder(option: str, files: ModelFiles) -> Path | str:
    """--drafter auto|PATH -> the drafter's folder. auto: one trained for this model next to it
    (`xqchat train-drafter` puts it there), else the one shipped for it, else "lookup" (prompt
    lookup's beam alone: any model speculates)."""
    if option != "auto":
        return Path(option).expanduser()
    for folder in (derived_dir(files) / "drafter", SHIPPED / files.name):
        if (folder / CONFIG).is_file():
            return folder
    return "lookup"
