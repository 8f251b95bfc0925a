"""The recurrent drafter in PyTorch (ReDrafter, arXiv 2403.09919; DESIGN §6) and its beam search.

An RNN runs over the target's own frozen token embeddings, s_k = SiLU(W E(x_k) + U s_{k-1} + b),
s_0 = 0; each step reads [h ; s_k], where h is the target's final hidden state (after its final
norm) at the last token the cache holds, through a few residual SiLU blocks and a projection to the
target's width, and the target's own frozen LM head turns that into logits: a private head would be
as large as a small target. With a draft vocabulary the head is cut to the rows of the target's most
frequent output tokens, which makes each draft step cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..drafter import WEIGHTS, DrafterConfig


class RecurrentDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        d = config.dim
        self.config = config
        self.input = nn.Linear(d, d)  # W E(x) + b
        self.recur = nn.Linear(d, d, bias=False)  # U s
        self.blocks = nn.ModuleList(nn.Linear(2 * d, 2 * d) for _ in range(config.blocks))
        self.out = nn.Linear(2 * d, d)  # to the width the target's LM head reads
        self.register_buffer("vocab", torch.zeros(config.draft_vocab, dtype=torch.long))

    def step(self, embedded: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The next RNN state from the embedded input token and the previous state, (B, d)."""
        return F.silu(self.input(embedded) + self.recur(state))

    def features(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """(…, d) target hidden state and RNN state -> (…, d), what the LM head reads."""
        x = torch.cat([hidden, state], dim=-1)
        for block in self.blocks:
            x = x + F.silu(block(x))
        return self.out(x)

    def save(self, folder: Path) -> None:
        """In fp16: half the file, and a draft step runs in bf16 or fp32 anyway."""
        from safetensors.torch import save_file

        self.config.write(folder)
        state = {
            k: (v.half() if v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in self.state_dict().items()
        }
        save_file(state, Path(folder) / WEIGHTS)

    @classmethod
    def load(cls, folder: Path, device="cpu") -> RecurrentDrafter:
        from safetensors.torch import load_file

        drafter = cls(DrafterConfig.read(folder))
        drafter.load_state_dict(load_file(Path(folder) / WEIGHTS, device=str(device)))
        return drafter.to(device).eval()


class Drafter:
    """A RecurrentDrafter bound to its target: the target's embeddings in and LM head out."""

    def __init__(self, net: RecurrentDrafter, target):
        self.net = net.requires_grad_(False)
        self.target = target
        self.head, self.vocab = None, None
        if net.config.draft_vocab:  # the cut LM head: its rows for the draft vocabulary
            if target.spec.tied_embeddings:  # the lookup dequantizes an int8 table
                rows = target.embed(net.vocab)
            else:
                rows = target.lm_head.dense_weight()[net.vocab]
            self.head = target.linear(rows.T.float().cpu().numpy())  # linear() moves it back
            self.vocab = net.vocab
        if target.bf16_paths is not None:  # bf16 on the CPU path the target's own weights take:
            for name in ("input", "recur", "out"):  # a draft step is mostly reading these
                setattr(net, name, self._like_target(getattr(net, name)))
            net.blocks = nn.ModuleList(self._like_target(b) for b in net.blocks)

    def _like_target(self, layer: nn.Linear):
        return self.target.linear(layer.weight.T.float().cpu().numpy(), layer.bias)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.target.logits(features).float()
        return self.head(features).float()

    @torch.inference_mode()
    def draft(self, hidden: torch.Tensor, token: int, width: int, length: int) -> np.ndarray:
        """Beam search: `width` beams of `length` tokens, each beginning with `token` (the target's
        own next token; `hidden` is its final hidden state at the token before), the rest drafted.
        Returns (width, length) token ids, best beam first."""
        embed = self.target.embed
        h = hidden.float()[None]  # (1, d)
        state = torch.zeros_like(h)
        beams = torch.tensor([[token]], device=h.device)  # (B, k)
        scores = torch.zeros(1, device=h.device)
        for _ in range(length - 1):
            state = self.net.step(embed(beams[:, -1]).float(), state)
            logp = torch.log_softmax(
                self.logits(self.net.features(h.expand(len(beams), -1), state)), -1
            )
            n_vocab = logp.shape[-1]
            scores, index = (scores[:, None] + logp).flatten().topk(width)
            parent, choice = index // n_vocab, index % n_vocab
            tokens = choice if self.vocab is None else self.vocab[choice]
            beams = torch.cat([beams[parent], tokens[:, None]], dim=1)
            state = state[parent]
        if len(beams) < width:  # length 1: every beam is the target's own token
            beams = beams.expand(width, -1)
        return beams.cpu().numpy()


def load_drafter(folder, target) -> Drafter:
    config = DrafterConfig.read(folder)
    config.check(target.spec, folder)
    return Drafter(RecurrentDrafter.load(folder, target.embed.weight.device), target)
