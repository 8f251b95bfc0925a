"""`xqchat bench ppl|speed` and `xqchat train-drafter`: the commands that measure or train for
minutes to hours, so every value is checked before the model loads."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import click

from xqchat.backends.base import EngineOptions
from xqchat.models.errors import XQError

from . import bench as benchmarks
from . import llama_bench
from .loading import load_engine, note, status
from .options import (
    MAX_BEAM_LENGTH,
    ModelName,
    OutputFolder,
    Preflight,
    check_utf8_lines,
    drafter_options,
    given,
    model_options,
    prepare,
    read_text_file,
)


@click.group()
def bench():
    """Measure quality (perplexity) and speed on this machine."""


def report(result: dict, engine, as_json: bool) -> None:
    result.update(
        backend=engine.backend,
        device=engine.device,
        weights=engine.dtype,
        weight_bytes=engine.weight_bytes(),
        # the process's peak: resetting the per-phase peaks (bench speed) resets this one too
        peak_rss_bytes=max(
            [benchmarks.peak_rss_bytes()]
            + [v for k, v in result.items() if k.startswith("peak_rss_") and v is not None]
        ),
        paths=engine.paths,  # which path each kind of product took (CPU: cpu_paths.py)
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            text = f"{value:.4g}" if isinstance(value, float) else value
            if isinstance(value, (list, dict)):
                text = json.dumps(value)
            click.echo(f"{key:>24}  {text}")


@bench.command(
    epilog="""
\b
Example:
  xqchat bench ppl --text ../shared/data/wikitext2_test.txt --window 1024 --windows 8 --chunk 128
"""
)
@model_options
@click.option(
    "--text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Plain-text corpus, e.g. WikiText-2 test; read as UTF-8 (a note says how many invalid "
    "bytes became U+FFFD).",
)
@click.option(
    "--window",
    type=click.IntRange(min=2),
    default=1024,
    show_default=True,
    help="Tokens per window; each window starts from an empty cache.",
)
@click.option(
    "--windows",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Number of windows (0 = the whole text).",
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Tokens fed per step; each chunk attends to the cache of all before it.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ppl(ctx, text, window, windows, chunk, as_json, **options):
    """Perplexity of a text through the real cache path."""
    corpus = read_text_file(text, note)
    checked, opts = prepare(ctx, **options)
    checked.fits_context(window, f"--window {window} is more than")
    _, tokenizer, engine = load_engine(checked.files, opts)
    result = benchmarks.perplexity(engine, tokenizer, corpus, window, windows, chunk, status)
    status("")
    report(result, engine, as_json)


@bench.command(
    epilog="""
\b
Examples:
  xqchat bench speed --new-tokens 128 --compare hf
  xqchat bench speed --prompts ../shared/data/mt_bench_questions.jsonl --json
  xqchat bench speed --drafter auto --beam-width 1 --lookup 7
  xqchat bench speed -m model-Q4_K_M.gguf --compare llama.cpp --rounds 3
\b
--compare llama.cpp runs llama-cpp-python from .bench/llama-cpp-LEVEL (made by
packaging/install_llama_cpp.sh LEVEL) in a process of its own, on the same GGUF file and the same
prompt token ids, with as many threads as ours; its peak RSS and load time are its own.
"""
)
@model_options
@drafter_options
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL with {"turns": [...]} per line (MT-Bench); the first turn of each is used.',
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts."
)
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--context",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Prepend about this many tokens of filler, to time decode deep in a chat.",
)
@click.option(
    "--compare",
    type=click.Choice(["none", "hf", "mlx-lm", "llama.cpp"]),
    default="none",
    show_default=True,
    help="Also time a baseline on the same weights: transformers' generate (hf) or mlx-lm's, "
    "in bf16 and in our dtype; or llama.cpp on the same GGUF file.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Time ours and the baseline alternately N times; the report gives each run and the "
    "medians.",
)
@click.option(
    "--llama-cpp",
    "llama_level",
    type=click.Choice(llama_bench.LEVELS),
    default=None,
    help="Which llama.cpp build --compare llama.cpp runs (default: this CPU's, avx512 or avx2).",
)
@click.option(
    "--llama-kv",
    type=click.Choice(llama_bench.KV_TYPES),
    default="f16",
    show_default=True,
    help="llama.cpp's KV cache type (q8_0 turns its flash attention on, which it needs).",
)
@click.option(
    "--profile", is_flag=True, help="Also profile decode steps: time in matmuls vs the rest."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def speed(
    ctx,
    prompts,
    limit,
    new_tokens,
    context,
    compare,
    rounds,
    llama_level,
    llama_kv,
    profile,
    as_json,
    **options,
):
    """Prefill and decode speed, greedy, a fixed number of new tokens per prompt."""
    for name in ("llama_level", "llama_kv"):
        if given(ctx, name) and compare != "llama.cpp":
            flag = "--llama-cpp" if name == "llama_level" else "--llama-kv"
            raise click.UsageError(f"{flag} applies to --compare llama.cpp only")
    texts = read_prompt_file(prompts)[:limit]
    checked, opts = prepare(ctx, **options)
    checked.fits_context(  # a prompt has a token or more
        context + new_tokens + 1,
        f"--context {context} and --new-tokens {new_tokens} leave no room for a prompt in",
    )
    build = None
    if compare == "llama.cpp":
        if checked.files.format != "gguf":
            raise XQError(
                f"--compare llama.cpp needs a GGUF model (llama.cpp reads GGUF files only); "
                f"{checked.files.name} is {checked.files.format}"
            )
        build = llama_bench.find_build(llama_level or llama_bench.default_level())
    elif compare != "none":
        check_baseline(compare)
    load_peak: dict = {}
    files, tokenizer, engine = benchmarks.phase_peak(
        load_peak, "load", lambda: load_engine(checked.files, opts)
    )
    rendered = benchmarks.render_prompts(tokenizer, texts, context)
    with contextlib.ExitStack() as stack:
        baselines = {}  # (name, weights) -> a call that times one run
        if compare == "llama.cpp":
            status(f"loading llama.cpp ({build.name}) …")
            llama = stack.enter_context(
                llama_bench.LlamaCpp(
                    build,
                    files.path,
                    llama_bench.context_for(rendered, new_tokens),
                    engine_threads(),
                    llama_kv,
                )
            )
            weights = llama_bench.file_type_name(llama.loaded["file_type"])
            baselines[("llama.cpp", weights)] = lambda: llama.speed(rendered, new_tokens)
        elif compare != "none":
            # the usual setup, and ours where the baseline has it (it has no int8 weights)
            dtypes = dict.fromkeys(["bf16", engine.dtype] if engine.dtype != "int8" else ["bf16"])
            if engine.dtype == "int8":
                note(f"{compare} has no int8 weights of ours: its baseline is timed in bf16 only")
            for dtype in dtypes:
                baselines[(compare, dtype)] = functools.partial(
                    baseline_speed, compare, files, tokenizer, dtype, rendered, new_tokens
                )
        ours, theirs = alternate(
            lambda: benchmarks.speed(engine, rendered, new_tokens, status), baselines, rounds
        )
    result = dict(ours[-1], **medians(ours), peak_rss_load_bytes=load_peak["load"])
    if rounds > 1:
        result["rounds"] = rounds
        result["runs"] = [runs_entry(run) for run in ours]
    if engine.drafter is not None:
        result["beam_width"], result["beam_length"] = engine.beams
        result["lookup"] = engine.lookup
        result["tree"] = opts.tree
    if engine.speculation is not None:  # what it measured and chose last
        policy = engine.speculation
        result["tree_chosen"] = str(policy.best)
        if policy.estimate is not None:
            result["best_tree_tok_s"], result["plain_tok_s"] = policy.estimate
    if profile:
        status("profiling decode steps …")
        result["profile"] = engine.profile_decode(rendered[0], steps=min(new_tokens, 64))
    if compare != "none":
        result["baselines"] = []
        for (name, weights), runs in theirs.items():
            entry = {"name": name, "weights": weights, **medians(runs)}
            entry["decode_speedup"] = result["decode_tok_s"] / entry["decode_tok_s"]
            entry["prefill_speedup"] = result["prefill_tok_s"] / entry["prefill_tok_s"]
            if name == "llama.cpp":
                entry.update(
                    peak_rss_bytes=max(run["peak_rss_bytes"] for run in runs),
                    load_s=llama.loaded["load_s"],
                    kv_cache=llama_kv,
                    flash_attn=llama.loaded["flash_attn"],
                    threads=llama.n_threads,
                    n_ctx=llama.n_ctx,
                    build=build.name,
                )
            if rounds > 1:
                entry["runs"] = [runs_entry(run) for run in runs]
            result["baselines"].append(entry)
    status("")
    report(result, engine, as_json)


def alternate(ours, baselines: dict, rounds: int) -> tuple[list[dict], dict]:
    """Run `ours` and then each baseline, `rounds` times over, so a machine that slows down (heat,
    another process) slows both alike. Returns our runs and each baseline's, as dicts with
    prefill_tok_s and decode_tok_s (a baseline may return the pair as a tuple)."""
    runs: list[dict] = []
    theirs: dict = {key: [] for key in baselines}
    for r in range(rounds):
        runs.append(ours())
        for (name, weights), run in baselines.items():
            status(f"round {r + 1}/{rounds}: timing {name} ({weights}) …")
            timed = run()
            if isinstance(timed, tuple):
                timed = {"prefill_tok_s": timed[0], "decode_tok_s": timed[1]}
            theirs[(name, weights)].append(timed)
    return runs, theirs


def medians(runs: list[dict]) -> dict:
    return {
        key: statistics.median(run[key] for run in runs)
        for key in ("decode_tok_s", "prefill_tok_s")
    }


def runs_entry(run: dict) -> dict:
    return {key: run[key] for key in ("decode_tok_s", "prefill_tok_s")}


def engine_threads() -> int:
    """The threads our engine computes with, for llama.cpp to get as many: PyTorch's count when
    the engine runs on it (already imported by then), else the CPUs this process may use."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_baseline(name: str) -> None:
    """The baseline --compare names can run here: checked before the benchmark, not after it."""
    import importlib.util

    needs = {"hf": ("torch", "pip install torch"), "mlx-lm": ("mlx_lm", "pip install mlx-lm")}
    module, install = needs[name]
    if importlib.util.find_spec(module) is None:
        raise XQError(f"--compare {name} needs {module}, which is not installed: {install}")


def read_prompt_file(path: Path | None) -> list[str]:
    """--prompts: JSON Lines, checked to be UTF-8 first (benchmarks.read_prompts would fail on
    a stray byte with a UnicodeDecodeError); the built-in prompt without a file."""
    if path is not None:
        check_utf8_lines(path)
    return benchmarks.read_prompts(path)


def baseline_speed(name: str, files, tokenizer, dtype: str, rendered, new_tokens: int):
    if name == "hf":
        from xqchat.backends.cuda.reference import hf_model, hf_speed

        return hf_speed(hf_model(files, dtype), rendered, new_tokens)
    from xqchat.backends.mlx.reference import mlx_lm_speed

    return mlx_lm_speed(files, tokenizer, dtype, rendered, new_tokens)


@click.command(
    "train-drafter",
    epilog="""
\b
The model answers the prompts (greedy) once; its answers are saved in the output folder batch
by batch, and checkpoints every 100 steps, so a run that is stopped (Ctrl+C) resumes where it was.
Examples:
  xqchat train-drafter                          # the default model, built-in prompts
  xqchat train-drafter --limit 6000 --steps 4000  # the shipped drafter: about an hour, 2 cores
  xqchat train-drafter --steps 500 --prompts my_prompts.jsonl
  xqchat run --drafter auto "Hello"             # use it
""",
)
@click.option(
    "--model",
    "-m",
    type=ModelName(),
    default="default",
    show_default=True,
    help="The model to draft for.",
)
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL with {"turns": [...]} per line; default: built-in chat-style requests.',
)
@click.option(
    "--limit", type=click.IntRange(min=2), default=240, show_default=True, help="Prompts to use."
)
@click.option(
    "--out",
    type=OutputFolder(),
    default=None,
    help="Folder for the drafter (default: next to the model, where --drafter auto looks).",
)
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=8), default=160, show_default=True)
@click.option(
    "--beam-length", type=click.IntRange(2, MAX_BEAM_LENGTH), default=4, show_default=True
)
@click.option(
    "--draft-vocab",
    type=click.IntRange(min=0),
    default=8192,
    show_default=True,
    help="Proposes only the model's N most frequent output tokens (0: the whole vocabulary).",
)
def train_drafter(model, prompts, limit, out, steps, new_tokens, beam_length, draft_vocab):
    """Train a recurrent drafter for MODEL by self-distillation (the model itself is frozen)."""
    from tqdm import tqdm

    from xqchat.backends.cuda.train_drafter import TrainConfig, train
    from xqchat.models.paths import derived_dir

    from .drafter_prompts import default_prompts

    texts = read_prompt_file(prompts)[:limit] if prompts else default_prompts(limit)
    if len(texts) < 2:  # one prompt's answers are held out to measure the drafter
        raise XQError(f"{prompts} holds 1 prompt; training needs 2 or more")
    checked = Preflight(model)
    checked.engine("torch", "auto")  # training is PyTorch's, on the default device
    checked.fits_context(
        new_tokens + 1, f"--new-tokens {new_tokens} leaves no room for a prompt in"
    )
    out = out or derived_dir(checked.files) / "drafter"
    try:  # now, not after the answering stage (minutes to an hour)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot make {out}: {e.strerror}", param_hint="'--out'") from None
    # (no drafter: the one being trained may be half written)
    opts = EngineOptions(backend="torch", drafter=None)
    files, tokenizer, engine = load_engine(checked.files, opts)
    rendered = benchmarks.render_prompts(tokenizer, texts, 0)
    cfg = TrainConfig(
        steps=steps,
        length=beam_length,
        draft_vocab=draft_vocab,
        new_tokens=new_tokens,
        held_out=max(1, min(8, len(texts) // 10)),
    )
    bars: dict = {}

    def stage_bar(name, total, unit, done):
        # One bar per stage, made on the stage's first report.
        if name not in bars:
            bars[name] = tqdm(total=total, desc=name, unit=unit)
        bars[name].update(done - bars[name].n)
        return bars[name]

    def answering(i, n):
        stage_bar("answering", n, "prompt", i)

    def training(step, loss, accepted):
        held = f"{accepted:.2f}" if accepted is not None else "…"
        stage_bar("training", steps, "step", step).set_postfix_str(
            f"loss {loss:.3f}, held-out tokens/step {held}"
        )

    stop = tokenizer.stop_tokens
    result = train(engine, files, rendered, stop, out, cfg, answering, training)
    for bar in bars.values():
        bar.close()
    click.echo(
        f"drafter for {files.name}: {result['parameters'] / 1e6:.1f} M parameters, draft "
        f"vocabulary {result['draft_vocab']}, held-out {result['held_out_tokens_per_step']:.2f} "
        f"tokens/step (one beam) after {result['steps']} steps: {result['folder']}"
    )
