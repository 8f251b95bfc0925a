"""`xqchat bench`: perplexity through the real cache path, and prefill/decode speed."""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from xqchat.backends.base import GenerationConfig, Model
from xqchat.models.errors import XQError
from xqchat.models.tokenizer import Tokenizer

BUILTIN_PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the keeper, the storm that night, and what the message says."
)


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Start a new peak of resident memory (Linux: the high-water mark resets on request);
    False where the system keeps only the process's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int | None:
    """The peak resident memory since `reset_peak_rss` (VmHWM), or None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def phase_peak(phase_peaks: dict, phase: str, run: Callable):
    """run(), and the peak RSS it reached kept in phase_peaks[phase] (the largest over calls;
    None where the system cannot tell)."""
    known = reset_peak_rss()
    result = run()
    peak = peak_rss_since_reset() if known else None
    if peak is None or phase_peaks.get(phase, 0) is None:
        phase_peaks[phase] = None
    else:
        phase_peaks[phase] = max(phase_peaks.get(phase, 0), peak)
    return result


def read_prompts(path: Path | None) -> list[str]:
    """MT-Bench-style JSONL ({"turns": [...]}, first turn used) or the built-in prompt."""
    if path is None:
        return [BUILTIN_PROMPT]
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["turns"]
            prompts.append(str(turns[0]))
        except (ValueError, KeyError, IndexError, TypeError):
            raise XQError(
                f'{path}:{number}: expected a JSON object with a non-empty "turns" list'
            ) from None
    if not prompts:
        raise XQError(f"{path} holds no prompts")
    return prompts


def context_filler(tokenizer: Tokenizer, n_tokens: int) -> str:
    """About `n_tokens` tokens of neutral text, to measure decode speed deep into a chat."""
    sentence = "The archive keeps letters, maps and ledgers from many towns along the river. "
    ids = tokenizer.encode(sentence * (n_tokens // 8 + 1))[:n_tokens]
    return tokenizer.decode(ids)


def render_prompts(tokenizer: Tokenizer, prompts: list[str], context: int) -> list[list[int]]:
    filler = context_filler(tokenizer, context) + "\n\n" if context else ""
    return [tokenizer.render([{"role": "user", "content": filler + p}]) for p in prompts]


def speed(
    model: Model, rendered: list[list[int]], new_tokens: int, progress: Callable[[str], None]
) -> dict:
    """Greedy, exactly `new_tokens` per prompt (stop tokens ignored), totals over all prompts, and
    the peak RSS while prefilling and while decoding (the largest over prompts)."""
    cfg = GenerationConfig(max_tokens=new_tokens)
    prefill_tokens = prefill_s = decode_tokens = decode_s = steps = 0.0
    cache_bytes = 0
    peaks: dict = {}  # peak RSS while reading prompts and while decoding
    for i, ids in enumerate(rendered, 1):
        progress(f"prompt {i}/{len(rendered)}: {len(ids)} prompt tokens")
        if len(ids) + new_tokens > model.spec.max_context:
            raise XQError(
                f"prompt {i} plus {new_tokens} new tokens exceeds the context ({model.spec.max_context})"
            )
        session = model.new_session()
        phase_peak(peaks, "prefill", lambda s=session, ids=ids: s.prefill(ids))
        *_, event = phase_peak(peaks, "decode", lambda s=session: list(s.generate(cfg)))
        prefill_tokens += event.prompt_tokens
        prefill_s += event.prompt_tokens / event.prefill_tok_s
        if event.new_tokens > 1:
            decode_tokens += event.new_tokens - 1
            decode_s += (event.new_tokens - 1) / event.decode_tok_s
            if event.accepted_per_step:
                steps += (event.new_tokens - 1) / event.accepted_per_step
        cache_bytes = max(cache_bytes, event.cache_bytes)
    return {
        "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
        "prefill_tok_s": prefill_tokens / prefill_s,
        "accepted_per_step": decode_tokens / steps if steps else None,
        "cache_bytes": cache_bytes,
        "peak_rss_prefill_bytes": peaks.get("prefill"),
        "peak_rss_decode_bytes": peaks.get("decode"),
        "prompts": len(rendered),
        "prompt_tokens": int(prefill_tokens),
        "new_tokens": new_tokens,
    }


def perplexity(
    model: Model,
    tokenizer: Tokenizer,
    text: str,
    window: int,
    windows: int,
    chunk: int,
    progress: Callable[[str], None],
) -> dict:
    """Each window starts from an empty cache; its tokens go through in chunks that attend to the
    cache of everything before them, exactly as a chat's turns would."""
    ids = tokenizer.encode(text)
    n_windows = min(windows, len(ids) // window) if windows else len(ids) // window
    if n_windows < 1:
        raise XQError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    nll = 0.0
    scored = 0
    memory = None
    for w in range(n_windows):
        progress(f"window {w + 1}/{n_windows}")
        segment = ids[w * window : (w + 1) * window]
        session = model.new_session()
        session.prefill(segment[:1])
        for i in range(1, window, chunk):
            logprobs = session.logprobs(segment[i : i + chunk])
            nll -= sum(logprobs)
            scored += len(logprobs)
        memory = session.memory()
    stored = memory.tokens - memory.residual_tokens  # tokens in the compressed store
    bytes_per_token = (memory.cache_bytes - memory.residual_bytes) / stored if stored else None
    fp16_per_token = memory.fp16_kv_bytes / memory.tokens
    return {
        "ppl": math.exp(nll / scored),
        "tokens": scored,
        "windows": n_windows,
        "window": window,
        "chunk": chunk,
        "cache_bytes_per_token": memory.cache_bytes / memory.tokens,
        # the compressed store alone, at the window's end (null when the window never outgrew the
        # exact window of newest tokens, a fixed cost reported on its own)
        "bytes_per_token": bytes_per_token,
        "residual_bytes": memory.residual_bytes,
        "fp16_kv_bytes_per_token": fp16_per_token,
        "compression": fp16_per_token / bytes_per_token if bytes_per_token else None,
        # XQuant's encode/rebuild matrices: held once per model, whatever the chat's length
        "factor_bytes": memory.factor_bytes,
    }


INT8_SAMPLE = (
    "The river rises in the hills to the north and reaches the sea after four hundred "
    "kilometres. In 1850 the town council built a stone bridge; it was rebuilt in 1923 after a "
    "flood. Question: how long is the river? Answer: about 400 km, according to the survey."
)


def int8_outliers(
    tokenizer: Tokenizer, model: Model, text: str, n_tokens: int, threshold: float
) -> dict:
    """LLM.int8's outlier features of `model` on up to `n_tokens` tokens of `text`: for each
    layer's input to each int8 matrix, the features beyond the threshold and in how many tokens."""
    ids = tokenizer.encode(text)[:n_tokens]
    counts = model.int8_outliers(ids)
    layers = []
    for name, hits in counts.items():
        if name.endswith("attention.wkv"):
            continue  # the same input as wq
        columns = sorted(((int(c), int(hits[c])) for c in hits.nonzero()[0]), key=lambda h: -h[1])
        layers.append({"matrix": name, "features": len(columns), "tokens_per_feature": columns})
    return {"tokens": len(ids), "threshold": threshold, "matrices": layers}


def format_int8_outliers(stats: dict) -> list[str]:
    lines = [
        f"outlier features (|x| > {stats['threshold']:g}) in {stats['tokens']} tokens: "
        "feature:share of tokens, most frequent first"
    ]
    width = max(len(m["matrix"]) for m in stats["matrices"])
    for m in stats["matrices"]:
        shares = " ".join(f"{c}:{n / stats['tokens']:.0%}" for c, n in m["tokens_per_feature"][:8])
        more = f" (+{m['features'] - 8} more)" if m["features"] > 8 else ""
        lines.append(f"{m['matrix'] + ' input':<{width + 6}}  {m['features']:>4}  {shares}{more}")
    return lines
