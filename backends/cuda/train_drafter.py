"""Training a recurrent drafter by self-distillation (ReDrafter, arXiv 2403.09919, §3.3), PyTorch.

The target is frozen. It answers the training prompts greedily; its answers are the labels and its
final hidden states the drafter's conditioning, so the drafter learns to predict what this target
says, not what some corpus says. At each answer position t (h = the target's hidden state at t,
the target's next token x_{t+1} given), the drafter predicts x_{t+2} .. x_{t+L} from its RNN over
x_{t+1} .. x_{t+L-1}; the loss is the sum of the L-1 cross-entropies against the target's own
distributions at those positions (soft labels, not just their argmax). AdamW, cosine schedule with
linear warmup. Everything lands in the output folder as it is made (the answers, then checkpoints),
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..drafter import DrafterConfig, target_key
from .drafter import RecurrentDrafter
from .model import DTYPES

DATA, STATE = "answers.safetensors", "training-state.safetensors"
PARTS = "answers-so-far"  # the batches answered before `DATA` is whole


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch: int = 256  # answer positions per step
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of the steps
    length: int = 4  # beam length the drafter is trained for (L, the target's own token included)
    blocks: int = 1
    draft_vocab: int = 8192
    new_tokens: int = 160  # answer length per prompt
    answer_batch: int = 96  # prompts answered together
    held_out: int = 8  # prompts kept for measuring acceptance
    seed: int = 0


def greedy_answers(
    files, groups: Iterable[list[list[int]]], new_tokens: int, stop: frozenset[int], dtype
):
    """The model's greedy answers to each group of rendered prompts, group by group, with the
    final hidden states (after the final norm) of every token but the last: up to `new_tokens`
    each, ending with the first stop token (what follows is no part of a chat; padding it would
    teach the drafter to predict padding). Batched through transformers' generate, in the
    engine's own `dtype` so the answers are what the engine says: a batch of 96 costs about as
    much as a few sequences on a CPU, which turns hours of answering into minutes. The hidden
    states are the ones generate computes anyway (a second pass over the answers cost as much
    as answering), caught as the final norm puts them out: generate's own `hidden_states` would
    hold every layer's for the whole batch. The model is loaded at the first group."""
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGeneration

    gguf = {"gguf_file": files.path.name} if files.format == "gguf" else {}
    folder = files.path.parent if gguf else files.path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **gguf).eval()
    settings = HFGeneration(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=sorted(stop),
        pad_token_id=0,
    )
    states = []  # per forward: the whole prompt first, then one answer token each
    model.model.norm.register_forward_hook(lambda module, args, out: states.append(out))
    for group in groups:
        width = max(map(len, group))  # left-padded, so every answer starts at `width`
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        states.clear()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
        hidden = torch.cat(states, dim=1)
        replies = out[:, width:].tolist()
        answers = []
        for row, (prompt, reply) in enumerate(zip(group, replies, strict=True)):
            n = next((i + 1 for i, t in enumerate(reply) if t in stop), len(reply))
            # a copy: a view would keep the whole batch's states alive (and shares storage,
            # which safetensors refuses to save)
            answers.append((reply[:n], hidden[row, width - len(prompt) : width + n - 1].clone()))
        yield answers


def answer(engine, files, prompts: list[list[int]], cfg, stop, progress, parts: Path) -> list[dict]:
    """Each rendered prompt with the target's greedy answer and its final hidden states (the
    drafter's conditioning). Each batch of answers lands in `parts` as soon as it is made, so an
    interrupted run answers only what it had not (a saved batch counts only if it holds exactly
    its prompts)."""
    parts.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(prompts), cfg.answer_batch)

    def saved(first: int) -> list[dict] | None:
        path = parts / f"{first:06d}.safetensors"
        records = load_answers(path) if path.is_file() else []
        group = prompts[first : first + cfg.answer_batch]
        matches = len(records) == len(group) and all(
            r["tokens"][: len(ids)].tolist() == ids for r, ids in zip(records, group, strict=True)
        )
        return records if matches else None

    batches = {first: saved(first) for first in starts}  # each part file is read once
    todo = [first for first, records in batches.items() if records is None]
    done = len(prompts) - sum(len(prompts[f : f + cfg.answer_batch]) for f in todo)
    progress(done, len(prompts))
    groups = (prompts[f : f + cfg.answer_batch] for f in todo)
    dtype = DTYPES.get(engine.dtype, torch.bfloat16)  # int8 weights: the bf16 they came from
    answers = greedy_answers(files, groups, cfg.new_tokens, stop, dtype)  # loads the model
    for first in todo:
        records = [
            {"tokens": torch.tensor(ids + reply), "hidden": hidden.half(), "start": len(ids) - 1}
            for ids, (reply, hidden) in zip(
                prompts[first : first + cfg.answer_batch], next(answers), strict=True
            )
        ]
        save_answers(records, parts / f"{first:06d}.safetensors")
        batches[first] = records
        done += len(records)
        progress(done, len(prompts))
    return [record for first in starts for record in batches[first]]


def save_answers(records: list[dict], path: Path) -> None:
    """Written under another name first, so a crash never leaves a torn file under `path`."""
    arrays = {}
    for i, r in enumerate(records):
        arrays[f"{i}.tokens"], arrays[f"{i}.hidden"] = r["tokens"], r["hidden"].contiguous()
        arrays[f"{i}.start"] = torch.tensor([r["start"]])
    partial = path.with_suffix(".partial")
    save_file(arrays, partial)
    partial.replace(path)


def load_answers(path: Path) -> list[dict]:
    arrays = load_file(path)
    n = len({k.split(".")[0] for k in arrays})
    return [
        {
            "tokens": arrays[f"{i}.tokens"],
            "hidden": arrays[f"{i}.hidden"],
            "start": int(arrays[f"{i}.start"]),
        }
        for i in range(n)
    ]


class Examples:
    """Answer positions as training examples, all answers laid end to end. For a position t: the
    target's hidden state at t, the drafter's inputs x_{t+1} .. x_{t+L-1}, the target's hidden
    states at those inputs (the target's next-token distribution there is the soft label) and the
    target's tokens x_{t+2} .. x_{t+L} as draft-vocabulary indices (-100 outside it). An
    answer's last token has no hidden state (nothing follows it): its row is padding, never read."""

    def __init__(self, records: list[dict], length: int, to_draft: torch.Tensor):
        tokens, hidden, ends, offset = [], [], [], 0
        for r in records:
            tokens.append(r["tokens"])
            hidden.append(F.pad(r["hidden"], (0, 0, 0, len(r["tokens"]) - len(r["hidden"]))))
            ends.append(offset + torch.arange(r["start"], len(r["tokens"]) - length))
            offset += len(r["tokens"])
        self.tokens, self.hidden, self.ends = torch.cat(tokens), torch.cat(hidden), torch.cat(ends)
        self.to_draft, self.steps = to_draft, torch.arange(1, length)

    def __len__(self) -> int:
        return len(self.ends)

    def batch(self, index):
        t = self.ends[index]
        steps = t[:, None] + self.steps
        hidden, teacher = self.hidden[t].float(), self.hidden[steps].float()
        return hidden, self.tokens[steps], teacher, self.to_draft[self.tokens[steps + 1]]


def drafter_logits(net, embed, head, hidden, inputs) -> torch.Tensor:
    """Teacher-forced drafter logits (B, L-1, V_draft) for inputs (B, L-1)."""
    state = torch.zeros_like(hidden)
    out = []
    for k in range(inputs.shape[1]):
        state = net.step(embed[inputs[:, k]], state)
        out.append(net.features(hidden, state) @ head.T)
    return torch.stack(out, dim=1)


def distillation_loss(logits, teacher, head) -> torch.Tensor:
    """Cross-entropy against the target's own next-token distribution (from its hidden states
    `teacher`, over the draft vocabulary), summed over the draft positions and averaged over the
    examples. The full distribution says more per position than its argmax alone, which matters
    when the answers are few: a 135M model answers about two prompts a second here."""
    target = torch.softmax(teacher @ head.T, dim=-1)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), reduction="sum")
    return loss / len(logits)


def acceptance(net, embed, head, examples: Examples) -> float:
    """Tokens per target step a one-beam drafter would reach on these examples: 1 (the target's
    own token) plus the run of leading draft tokens equal to the target's."""
    hidden, inputs, _, labels = examples.batch(torch.arange(len(examples)))
    with torch.no_grad():
        logits = drafter_logits(net, embed, head, hidden, inputs)
    hits = (logits.argmax(-1) == labels).int()
    return 1 + hits.cumprod(dim=1).sum(dim=1).float().mean().item()


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def save_state(path: Path, net, optimizer, step: int) -> None:
    """The drafter's weights, AdamW's moments and the step, as safetensors (no pickle)."""
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, moments in optimizer.state_dict()["state"].items():
        tensors.update({f"adam.{i}.{k}": v for k, v in moments.items()})
    save_file({k: v.clone() for k, v in tensors.items()}, path, metadata={"step": str(step)})


def load_state(path: Path, net, optimizer) -> int:
    """Restore what `save_state` wrote into `net` and `optimizer`; the step it was taken at."""
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        step = int(f.metadata()["step"])
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    return step


def train(
    engine,
    files,
    prompts: list[list[int]],
    stop: frozenset[int],
    out: Path,
    cfg: TrainConfig,
    answering: Callable[[int, int], None],
    training: Callable[[int, float, float | None], None],
) -> dict:
    """Train a drafter for `engine` (a loaded torch model of `files`) on its answers to `prompts`
    (rendered; answers end at a `stop` token); write it to `out`. `answering(i, n)` and `training(step, loss, held-out acceptance)` report
    progress."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if (out / DATA).is_file():
        records = load_answers(out / DATA)
    else:
        records = answer(engine, files, prompts, cfg, stop, answering, out / PARTS)
        save_answers(records, out / DATA)
        shutil.rmtree(out / PARTS)
    spec, module = engine.spec, engine.module
    table = module.embed.weight if spec.tied_embeddings else module.lm_head.dense_weight()
    embed = module.embed.weight.float()  # the RNN's inputs: the target's own embeddings
    # the draft vocabulary: the tokens the target itself says most (in the training answers)
    said = Counter(t for r in records[cfg.held_out :] for t in r["tokens"][r["start"] :].tolist())
    size = min(cfg.draft_vocab or spec.vocab_size, spec.vocab_size)
    vocab = torch.tensor(sorted(t for t, _ in said.most_common(size)))
    to_draft = torch.full((spec.vocab_size,), -100, dtype=torch.long)
    to_draft[vocab] = torch.arange(len(vocab))
    head = table[vocab].float()
    config = DrafterConfig(
        dim=spec.dim, blocks=cfg.blocks, draft_vocab=len(vocab), target=target_key(spec)
    )
    net = RecurrentDrafter(config)
    net.vocab.copy_(vocab)
    held = Examples(records[: cfg.held_out], cfg.length, to_draft)
    data = Examples(records[cfg.held_out :], cfg.length, to_draft)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = 0
    if (out / STATE).is_file():
        step = load_state(out / STATE, net, optimizer)
    generator = torch.Generator().manual_seed(cfg.seed + step)
    accepted = None
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        index = torch.randint(len(data), (cfg.batch,), generator=generator)
        hidden, inputs, teacher, _ = data.batch(index)
        loss = distillation_loss(drafter_logits(net, embed, head, hidden, inputs), teacher, head)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0 or step == cfg.steps:
            accepted = acceptance(net, embed, head, held)
            net.save(out)
            save_state(out / STATE, net, optimizer, step)
        training(step, loss.item(), accepted)
    accepted = acceptance(net, embed, head, held)
    net.save(out)
    return {
        "steps": step,
        "held_out_tokens_per_step": accepted,
        "draft_vocab": len(vocab),
        "parameters": sum(p.numel() for p in net.parameters()),
        "examples": len(data),
        "folder": str(out),
    }
