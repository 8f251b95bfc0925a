"""The recurrent drafter in MLX (mirror of backends/cuda/drafter.py; ReDrafter, arXiv 2403.09919).

An RNN runs over the target's own frozen token embeddings, s_k = SiLU(W E(x_k) + U s_{k-1} + b),
s_0 = 0; each step reads [h ; s_k], where h is the target's final hidden state (after its final
norm) at the last token the cache holds, through a few residual SiLU blocks and a projection to the
target's width, and the target's own frozen LM head turns that into logits. With a draft vocabulary
the head is cut to the rows of the target's most frequent output tokens.

Weights are held as nn.Linear's (out, in), the layout of the checkpoint both backends share.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..drafter import WEIGHTS, DrafterConfig


class RecurrentDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        d = config.dim
        self.config = config
        self.input = nn.Linear(d, d)  # W E(x) + b
        self.recur = nn.Linear(d, d, bias=False)  # U s
        self.blocks = [nn.Linear(2 * d, 2 * d) for _ in range(config.blocks)]
        self.out = nn.Linear(2 * d, d)  # to the width the target's LM head reads
        self.vocab = mx.zeros((config.draft_vocab,), dtype=mx.int64)

    def step(self, embedded: mx.array, state: mx.array) -> mx.array:
        """The next RNN state from the embedded input token and the previous state, (B, d)."""
        return nn.silu(self.input(embedded) + self.recur(state))

    def features(self, hidden: mx.array, state: mx.array) -> mx.array:
        """(…, d) target hidden state and RNN state -> (…, d), what the LM head reads."""
        x = mx.concatenate([hidden, state], axis=-1)
        for block in self.blocks:
            x = x + nn.silu(block(x))
        return self.out(x)

    def save(self, folder: Path) -> None:
        """In fp16: half the file, and a draft step runs in bf16 or fp32 anyway."""
        self.config.write(folder)
        weights = {
            k: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in nn.utils.tree_flatten(self.parameters())
        }
        mx.save_safetensors(str(Path(folder) / WEIGHTS), weights)

    @classmethod
    def load(cls, folder: Path) -> RecurrentDrafter:
        drafter = cls(DrafterConfig.read(folder))
        drafter.load_weights(str(Path(folder) / WEIGHTS), strict=True)
        drafter.set_dtype(mx.float32)  # stored in fp16
        mx.eval(drafter.parameters())
        return drafter


class Drafter:
    """A RecurrentDrafter bound to its target: the target's embeddings in and LM head out."""

    def __init__(self, net: RecurrentDrafter, target):
        self.net, self.target = net, target
        if net.config.draft_vocab:  # the cut LM head: its columns for the draft vocabulary
            if target.spec.tied_embeddings:  # the lookup dequantizes an int8 table
                columns = target.embed(net.vocab).T
            else:
                columns = target.lm_head.dense_weight()[:, net.vocab]
            self.head = columns.astype(mx.float32)  # (d, V_draft)
            self.vocab = net.vocab
        else:
            self.head, self.vocab = None, None

    def logits(self, features: mx.array) -> mx.array:
        if self.head is None:
            return self.target.logits(features).astype(mx.float32)
        return features @ self.head

    def draft(self, hidden: mx.array, token: int, width: int, length: int) -> np.ndarray:
        """Beam search: `width` beams of `length` tokens, each beginning with `token` (the target's
        own next token; `hidden` is its final hidden state at the token before), the rest drafted.
        Returns (width, length) token ids, best beam first."""
        h = hidden.astype(mx.float32)[None]  # (1, d)
        state = mx.zeros_like(h)
        beams = mx.array([[token]])  # (B, k)
        scores = mx.zeros((1,))
        for _ in range(length - 1):
            embedded = self.target.embed(beams[:, -1]).astype(mx.float32)
            state = self.net.step(embedded, state)
            features = self.net.features(mx.broadcast_to(h, (beams.shape[0], h.shape[1])), state)
            logits = self.logits(features)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            n_vocab = logp.shape[-1]
            total = (scores[:, None] + logp).flatten()
            index = mx.argpartition(-total, width - 1)[:width]
            index = index[mx.argsort(-total[index])]
            scores = total[index]
            parent, choice = index // n_vocab, index % n_vocab
            tokens = choice if self.vocab is None else self.vocab[choice]
            beams = mx.concatenate([beams[parent], tokens[:, None].astype(beams.dtype)], axis=1)
            state = state[parent]
            mx.eval(beams, state, scores)
        if beams.shape[0] < width:  # length 1: every beam is the target's own token
            beams = mx.broadcast_to(beams, (width, beams.shape[1]))
        return np.array(beams)


def load_drafter(folder, target) -> Drafter:
    config = DrafterConfig.read(folder)
    config.check(target.spec, folder)
    return Drafter(RecurrentDrafter.load(folder), target)
