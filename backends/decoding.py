"""What a conversation's state does regardless of framework: chunked prefill with timing, the
generation loop with its stats and finish reasons, trim and memory. Each backend's Session
subclasses it and supplies the tensor work: `_forward`, `_sample`, `_rng`, `logprobs`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from xqchat.models.errors import XQError

from .base import CacheMemory, CacheSpec, GenerationConfig, TokenEvent
from .drafter import accept_greedy, accept_sampled, build_tree, draw, lookup, processed_probs
from .speculation import Shape

CACHE_FORMAT = "xqchat-cache/2"

PREFILL_CHUNK = 512  # bounds attention's transient memory on long prompts
# States of the sliding-window layers kept for trim (see `trim`): where the last two prompts
# started and ended, the points a chat's edit or regenerate goes back to.
CHECKPOINTS = 4


class DecodingSession:
    def __init__(self, model, cache: CacheSpec | None = None):
        self.model = model
        self.spec = model.spec
        self.cache = cache or model.cache
        self.caches = self._new_caches()
        self.tokens: list[int] = []
        self._next_logits = None  # (V,) after the last token held
        self._next_hidden = None  # (dim,) the final hidden state of the last token held
        self._path = None  # the last speculative step: (start, logits, hidden, accepted path)
        self._prefilled = (0, 0, 0.0)  # (tokens fed, tokens reused, seconds) of the last prefill
        # position -> {layer: state} of the caches that hold only a window (backends/window.py)
        self.checkpoints: dict[int, dict] = {}
        self._refilled = (0, 0.0)  # (tokens, seconds) the last trim fed again (see `trim`)
        # LongRoPE (Phi-3/4 past their original context): rows from here on were rotated with
        # its long factors (see `_long_rows`); None while none is
        long_rope = self.spec.rope.long()
        self._long_after = None if long_rope is None else long_rope.original_max_position
        self._long_from: int | None = None
        # Told (tokens done, tokens to do) before each chunk of a prefill and once at its end, on
        # the thread that runs it: a front end shows progress through a long prompt with it.
        self.on_prefill: Callable[[int, int], None] | None = None

    # -- supplied by each backend --------------------------------------------------------------
    def _new_caches(self) -> list: ...
    def _forward(self, tokens: list[int], all_logits: bool = False):
        """Feed tokens through the model (extending the caches and self.tokens), set
        self._next_logits, and return the logits: of every token if all_logits, else the last."""

    def _sample(self, cfg: GenerationConfig, rng) -> int: ...
    def _verify(self, tree, start: int):
        """Feed a drafter's tree (backends/drafter.py) at positions start + depth, each node
        seeing the cache and its ancestors; return its (logits, final hidden states), (N, V) and
        (N, dim). The caches hold the tree's rows after it; self.tokens is left as it was."""

    def _argmax(self, logits) -> np.ndarray: ...  # (N, V) -> (N,) int
    def _numpy(self, logits) -> np.ndarray: ...  # one row of logits, (V,) float
    def _rng(self, seed: int | None): ...
    def _write(self, path: Path, arrays: dict, metadata: dict) -> None: ...
    def _read(self, path: Path) -> tuple[dict, dict]: ...
    def _bytes(self, array) -> bytes: ...

    # -- shared --------------------------------------------------------------------------------
    def prefill(self, tokens: list[int]) -> None:
        """Feed a prompt (or its new part). The tokens a trim had to feed again count as fed."""
        refilled, refill_s = self._refilled
        reused = len(self.tokens) - refilled
        start = time.perf_counter()
        self._checkpoint()  # where this turn starts: an edit of it comes back here
        self._feed(tokens)
        self._checkpoint()  # where its prompt ends: a regenerate comes back here
        seconds = time.perf_counter() - start + refill_s
        self._prefilled = (len(tokens) + refilled, reused, seconds)
        self._refilled = (0, 0.0)

    def _feed(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), PREFILL_CHUNK):
            if self.on_prefill is not None:
                self.on_prefill(i, len(tokens))
            self._forward(tokens[i : i + PREFILL_CHUNK])
        if self.on_prefill is not None:
            self.on_prefill(len(tokens), len(tokens))

    def _long_rows(self, start: int, last: int, tree: bool = False) -> int | None:
        """The row from which LongRoPE's long factors rotate, for a forward of rows start .. at
        positions up to `last`. As transformers: a forward whose last position is past the
        original length rotates its tokens with the long factors (all of a prompt's chunk that
        crosses it) and the rows fed before keep their rotation. A drafter's tree rotates each
        row as the plain step at its position would; its path decides (`_verify_tree`)."""
        if self._long_after is None or self._long_from is not None or last < self._long_after:
            return self._long_from
        if tree:
            return max(start, self._long_after)
        self._long_from = start
        return start

    def _windowed(self) -> list[int]:
        """The layers whose cache holds only a window of rows (backends/window.py)."""
        return [i for i, cache in enumerate(self.caches) if getattr(cache, "window", 0)]

    def _checkpoint(self) -> None:
        windowed, n = self._windowed(), len(self.tokens)
        if windowed and n and n not in self.checkpoints:
            self.checkpoints[n] = {i: self.caches[i].state_dict() for i in windowed}
            while len(self.checkpoints) > CHECKPOINTS:
                del self.checkpoints[next(iter(self.checkpoints))]  # the oldest taken

    def trim(self, n_keep: int) -> None:
        """Hold only the first n_keep tokens. A sliding-window layer may no longer hold the rows
        the next token needs: then the window layers go back to the newest checkpoint that can
        serve, and the tokens after it are fed again (counted as prefilled by the next
        `prefill`): exact, as a fresh run's state is."""
        target = min(n_keep, len(self.tokens))
        cut = target
        if self._long_from is not None and target <= self._long_after:
            # back within LongRoPE's original length, where a fresh run rotates every row with
            # the short factors: the rows rotated with the long ones are fed again
            cut = min(target, self._long_from)
        windowed = self._windowed()
        start = cut
        if not all(self.caches[i].can_trim(cut) for i in windowed):
            start = self._restore(cut, windowed)
        if self._long_from is not None and start <= self._long_from:
            self._long_from = None
        for cache in self.caches:
            cache.trim(start)
        refill = self.tokens[start:target]
        del self.tokens[start:]
        self.checkpoints = {p: s for p, s in self.checkpoints.items() if p <= start}
        self._next_logits = self._next_hidden = None
        began = time.perf_counter()
        for i in range(0, len(refill), PREFILL_CHUNK):
            self._forward(refill[i : i + PREFILL_CHUNK])
        self._refilled = (len(refill), time.perf_counter() - began if refill else 0.0)

    def _restore(self, target: int, windowed: list[int]) -> int:
        """Put the window layers back to the newest checkpoint from which `target` tokens are
        reached (trimming back, or feeding the tokens after it); return its position, 0 (the
        window layers emptied) when none serves."""
        for position in sorted(self.checkpoints, reverse=True):
            for i, state in self.checkpoints[position].items():
                self.caches[i].load_state_dict(state)
            if position <= target:
                return position
            if all(self.caches[i].can_trim(target) for i in windowed):
                return target
        fresh = self._new_caches()
        for i in windowed:
            self.caches[i] = fresh[i]
        return 0

    def save(self, path) -> None:
        """Write what the caches hold (and the tokens they hold) to `path`, a safetensors file,
        atomically: an interrupted save never leaves a damaged file under that name."""
        if self._next_logits is None:
            raise XQError("nothing to save: the session holds no tokens")
        arrays = {
            f"{i}.{name}": array
            for i, cache in enumerate(self.caches)
            for name, array in cache.state_dict().items()
        }
        arrays["next_logits"] = self._next_logits
        arrays |= {  # the window layers' checkpoints: a reloaded chat still goes back exactly
            f"checkpoint.{position}.{i}.{name}": array
            for position, states in self.checkpoints.items()
            for i, state in states.items()
            for name, array in state.items()
        }
        header = {
            "format": CACHE_FORMAT,
            "model": self._fingerprint(),
            "cache": dataclasses.asdict(self.cache),
            "tokens": self.tokens,
            "long_rope_from": self._long_from,
            "sha256": self._digest(arrays),
        }
        path = Path(path)
        partial = path.with_name(path.name + ".partial.safetensors")
        self._write(partial, arrays, {"xqchat": json.dumps(header)})
        partial.replace(path)

    def load(self, path) -> None:
        """Restore what `save` wrote, replacing this session's state; a file from another model,
        backend or cache kind, or a damaged one, is refused and the session is left as it was."""
        try:
            arrays, metadata = self._read(Path(path))
            header = json.loads(metadata["xqchat"])
        except FileNotFoundError:
            raise XQError(f"no saved cache at {path}") from None
        except Exception:
            raise XQError(f"{path} is not a readable xqchat cache (damaged or truncated)") from None
        if header.get("format") != CACHE_FORMAT:
            raise XQError(f"{path} is not an xqchat cache of a format this version reads")
        if header["model"] != self._fingerprint():
            saved = header["model"]
            raise XQError(
                f"{path} was saved by another model or engine ({saved['backend']}, "
                f"{saved['dtype']} weights, {saved['spec']['arch']} {saved['spec']['dim']}-dim)"
            )
        if header["cache"] != dataclasses.asdict(self.cache):
            c = header["cache"]
            raise XQError(
                f"{path} holds a {c['kind']} cache ({c['bits']} bits, group {c['group']}, "
                f"residual {c['residual']}, sink {c['sink']}); this session uses another: load it "
                "with those options"
            )
        if header["sha256"] != self._digest(arrays):
            raise XQError(f"{path} is damaged: its contents do not match their checksum")
        caches = self._new_caches()
        for i, cache in enumerate(caches):
            prefix = f"{i}."
            cache.load_state_dict(
                {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            )
        self.caches, self.tokens = caches, list(header["tokens"])
        self._long_from = header.get("long_rope_from")
        self.checkpoints = {}
        for key, array in arrays.items():
            if key.startswith("checkpoint."):
                _, position, i, name = key.split(".", 3)  # a name may hold dots
                states = self.checkpoints.setdefault(int(position), {})
                states.setdefault(int(i), {})[name] = array
        self.checkpoints = dict(sorted(self.checkpoints.items()))  # the oldest first, as taken
        self._next_logits = arrays["next_logits"]
        self._prefilled = (0, len(self.tokens), 0.0)

    def _fingerprint(self) -> dict:
        spec = dataclasses.asdict(self.spec)
        spec.pop("notes")
        # as the file's JSON header holds it (tuples, such as the windows, come back as lists)
        spec = json.loads(json.dumps(spec))
        return {"backend": self.model.backend, "dtype": self.model.dtype, "spec": spec}

    def _digest(self, arrays: dict) -> str:
        digest = hashlib.sha256()
        for name in sorted(arrays):
            digest.update(name.encode())
            digest.update(self._bytes(arrays[name]))
        return digest.hexdigest()

    def memory(self) -> CacheMemory:
        n = len(self.tokens)
        return CacheMemory(
            tokens=n,
            cache_bytes=sum(c.nbytes for c in self.caches),
            residual_bytes=sum(c.residual_nbytes for c in self.caches),
            residual_tokens=self.caches[0].residual_tokens,
            fp16_kv_bytes=self.spec.fp16_kv_bytes(n),
            reserved_bytes=sum(c.reserved_bytes for c in self.caches),
            factor_bytes=sum(getattr(c, "factor_nbytes", 0) for c in self.caches),
            checkpoint_bytes=sum(
                a.nbytes
                for states in self.checkpoints.values()
                for state in states.values()
                for a in state.values()
            ),
        )

    def generate(
        self, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Stream tokens. With a drafter, a target forward may verify a tree of drafted tokens and
        decide one or more tokens (`accepted_per_step`); the tokens are those a plain run would
        choose (greedy) or distributed as its choices are (sampling: each position's token is
        drawn with a uniform of its own, so a seed gives one reply whatever the trees were)."""
        assert self._next_logits is not None, "prefill before generate"
        speculate = self.model.drafter is not None
        if speculate:
            self._seed = np.random.SeedSequence(cfg.seed).entropy
            rng = None
        else:
            rng = self._rng(cfg.seed)
        step = self._speculative_step if speculate else self._plain_step
        policy = self.model.speculation if speculate else None
        fed, reused, prefill_s = self._prefilled
        prefill_tok_s = fed / prefill_s if prefill_s > 0 else 0.0
        first = time.perf_counter()
        n = steps = decided = 0
        pending = [self._choose(cfg) if speculate else self._sample(cfg, rng)]
        while True:
            # the cache holds everything before pending[-1]; a plain run's, everything before token
            for i, token in enumerate(pending):
                n += 1
                held = len(self.tokens) - (len(pending) - 1 - i)
                if token in cfg.stop_tokens:
                    finish = "stop"
                elif cancel is not None and cancel.is_set():
                    finish = "cancelled"
                elif n >= cfg.max_tokens:
                    finish = "length"
                elif held + 1 >= self.spec.max_context:
                    finish = "context"
                else:
                    finish = None
                if finish and held < len(self.tokens):
                    self._rewind(i)
                elapsed = time.perf_counter() - first
                mem = self.memory()
                yield TokenEvent(
                    token=token,
                    text="",
                    prompt_tokens=fed,
                    cached_tokens=reused,
                    new_tokens=n,
                    prefill_tok_s=prefill_tok_s,
                    decode_tok_s=(n - 1) / elapsed if n > 1 else 0.0,
                    cache_bytes=mem.cache_bytes,
                    fp16_kv_bytes=mem.fp16_kv_bytes,
                    accepted_per_step=decided / steps if speculate and steps else None,
                    speculation=policy.estimate if policy is not None else None,
                    finish_reason=finish,
                )
                if finish:
                    return
            pending = step(pending[-1], cfg, rng)
            steps += 1
            decided += len(pending)

    def _plain_step(self, token: int, cfg: GenerationConfig, rng) -> list[int]:
        self._forward([token])
        return [self._sample(cfg, rng)]

    def _choose(self, cfg: GenerationConfig) -> int:
        """The next token from self._next_logits (speculating: see `_uniform`)."""
        if cfg.temperature <= 0:
            return int(self._argmax(self._next_logits[None])[0])
        p = processed_probs(self._numpy(self._next_logits), cfg.temperature, cfg.top_p)
        return draw(p, self._uniform(len(self.tokens)))

    def _uniform(self, position: int) -> float:
        """The uniform that draws the token at `position`: one per position and seed, so the
        drawn tokens do not depend on which tree (or none) decided them."""
        return float(np.random.default_rng([self._seed, position]).random())

    def _speculative_step(self, token: int, cfg: GenerationConfig, rng) -> list[int]:
        """Draft beams after `token` (the drafter's, and prompt lookup's when it finds one) in the
        shape the policy chooses (else the largest), verify their tree in one target forward, keep
        the accepted path in the cache. Returns the tokens decided: the accepted drafts and the
        next token."""
        policy = self.model.speculation
        shape = policy.choose() if policy else Shape(*self.model.beams, self.model.lookup)
        clock = policy.clock if policy else time.perf_counter
        # a tree must fit where nothing held would be flushed (see TokenStore.room) and in context
        room = min(min(c.room for c in self.caches), self.spec.max_context - len(self.tokens) - 1)
        began = drafted = clock()
        if room < 2 or shape.plain or self._next_hidden is None:  # (None: a cache just loaded)
            decided = [self._plain_forward(token, cfg)]
            if policy:
                policy.record_plain(clock() - began)
            return decided
        beams = [[token]]
        if shape.drafts:
            beams = [*self.model.drafter.draft(self._next_hidden, token, *shape.drafter)]
            drafted = clock()
        drafter_beams = len(beams)
        found = lookup([*self.tokens, token], shape.lookup) if shape.lookup else []
        if found:  # one more beam: what followed these tokens before
            beams.append([token, *found])
        tree = build_tree(beams).prune(room)
        if len(tree) == 1:  # lookup found nothing and no drafter: a plain step
            decided, path = [self._plain_forward(token, cfg)], [0]
        else:
            decided, path = self._verify_tree(tree, cfg)
        if policy:
            seconds = clock() - drafted
            policy.record_tree(
                shape, tree.beam_nodes, drafter_beams, path, drafted - began, seconds
            )
        return decided

    def _plain_forward(self, token: int, cfg: GenerationConfig) -> int:
        self._path = None
        self._forward([token])
        return self._choose(cfg)

    def _verify_tree(self, tree, cfg: GenerationConfig) -> tuple[list[int], list[int]]:
        """Verify `tree` in one target forward and keep its accepted path in the cache. Returns
        the tokens decided (the accepted drafts and the next token) and the path's nodes."""
        start = len(self.tokens)
        logits, hidden = self._verify(tree, start)
        if cfg.temperature <= 0:
            argmax = self._argmax(logits)
            path = accept_greedy(tree, argmax)
            next_token = int(argmax[path[-1]])
        else:
            path, next_token = accept_sampled(
                tree,
                lambda node: processed_probs(self._numpy(logits[node]), cfg.temperature, cfg.top_p),
                lambda depth: self._uniform(start + depth + 1),
            )
        for cache in self.caches:
            cache.keep(start, path)
        self.tokens.extend(tree.tokens[path].tolist())
        if self._long_after is not None and self._long_from is None:
            if len(self.tokens) > self._long_after:  # the path reached LongRoPE's long rows
                self._long_from = max(start, self._long_after)
        self._path = (start, logits, hidden, path)
        self._next_logits, self._next_hidden = logits[path[-1]], hidden[path[-1]]
        return [*tree.tokens[path[1:]].tolist(), next_token], path

    def _rewind(self, i: int) -> None:
        """Generation ended at the i-th token the last step decided, before the last one: hold
        only what a plain run would (the tokens before it), as if it had run token by token."""
        start, logits, hidden, path = self._path
        for cache in self.caches:
            cache.trim(start + i + 1)
        del self.tokens[start + i + 1 :]
        if self._long_from is not None and len(self.tokens) <= self._long_from:
            self._long_from = None
        self._next_logits, self._next_hidden = logits[path[i]], hidden[path[i]]
