"""The `xqchat` command line. Errors the user can act on are printed as one line on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xqchat.backends.base import (
    CACHE_KINDS,
    WEIGHT_DTYPES,
    CacheSpec,
    EngineOptions,
    GenerationConfig,
)
from xqchat.backends.chat import OVERFLOW_POLICIES
from xqchat.models.errors import XQError

from . import bench as benchmarks

EXAMPLES_RUN = """
\b
Examples:
  xqchat run "Name three rivers in Europe."
  echo "Summarise: ..." | xqchat run - --max-tokens 200
  xqchat run --temperature 0.7 --top-p 0.9 --seed 1 "Write a haiku"
  xqchat run --json "Hi"          # stats object instead of streamed text
  xqchat run --drafter auto "Hi"  # speculative decoding: same text, fewer model steps
"""


ENGINE_OPTIONS = [
    click.option(
        "--model",
        "-m",
        default="default",
        show_default=True,
        help="Model: default (smollm2-135m), a pulled one (NAMESPACE/REPO, see `xqchat list`), "
        "a model directory or a .gguf file.",
    ),
    click.option(
        "--backend",
        type=click.Choice(["auto", "torch", "mlx"]),
        default="auto",
        show_default=True,
        help="Engine: auto = MLX on Apple Silicon, else PyTorch (CUDA when present).",
    ),
    click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
    ),
    click.option(
        "--weights",
        type=click.Choice(WEIGHT_DTYPES),
        default="auto",
        show_default=True,
        help="Working dtype of the weights; auto = the fastest on this hardware; int8 = LLM.int8() "
        "(int8 matrices with float outlier features: half the memory of bf16).",
    ),
    click.option(
        "--int8-threshold",
        type=click.FloatRange(min=0),
        default=6.0,
        show_default=True,
        help="--weights int8: input features with any |x| above this are multiplied in floating "
        "point (the outlier threshold of LLM.int8).",
    ),
    click.option(
        "--int8-head/--float-head",
        default=True,
        show_default=True,
        help="--weights int8: the LM head (a tied embedding table) in int8 too, or kept in "
        "floating point.",
    ),
    click.option(
        "--cache",
        type=click.Choice(CACHE_KINDS),
        default="kv",
        show_default=True,
        help="Attention cache: kv = exact K/V; kv-quant = K quantized per channel, V per token; "
        "xquant = the layer input X (GQA: its SVD latents) quantized, K/V rebuilt from it; "
        "xquant-cl = xquant storing each layer's difference from the layer before.",
    ),
    click.option(
        "--bits",
        type=click.Choice(["2", "3", "4", "8"]),
        default="4",
        show_default=True,
        help="Bits per cached value (quantized caches).",
    ),
    click.option(
        "--group",
        type=click.Choice(["32", "64", "128"]),
        default="128",
        show_default=True,
        help="Values sharing one fp16 scale and zero point (quantized caches).",
    ),
    click.option(
        "--mha",
        is_flag=True,
        help="Run a GQA model in its exact MHA form (K/V heads repeated), e.g. to measure xquant "
        "on X itself rather than on the SVD latents.",
    ),
    click.option(
        "--residual",
        type=click.IntRange(min=0),
        default=128,
        show_default=True,
        help="Newest tokens kept exact (quantized caches).",
    ),
    click.option(
        "--cache-sink",
        type=click.IntRange(0, 256),
        default=CacheSpec.sink,
        show_default=True,
        help="First tokens kept exact (quantized caches): attention sinks, which every later "
        "token attends to.",
    ),
]


DRAFTER_OPTIONS = [
    click.option(
        "--drafter",
        default="none",
        show_default=True,
        help="Speculative decoding with a recurrent drafter: none, auto (the one trained for "
        "this model by `xqchat train-drafter`, or shipped with xqchat), a drafter folder, or "
        "lookup (no drafter, only --lookup's beam: any model, no training). Greedy text is "
        "unchanged; sampling keeps the model's distribution.",
    ),
    click.option(
        "--beam-width",
        type=click.IntRange(min=1),
        default=EngineOptions.beam_width,
        show_default=True,
        help="Drafter beams per step.",
    ),
    click.option(
        "--beam-length",
        type=click.IntRange(min=1),
        default=EngineOptions.beam_length,
        show_default=True,
        help="Tokens per drafter beam, the model's own next token included.",
    ),
    click.option(
        "--lookup",
        type=click.IntRange(min=0),
        default=EngineOptions.lookup,
        show_default=True,
        help="One more beam of up to N tokens beside the drafter's: what followed the last few "
        "tokens where they occurred before in the chat (0: none).",
    ),
]


def model_options(f):
    for option in reversed(ENGINE_OPTIONS):
        f = option(f)
    return f


def drafter_options(f):
    for option in reversed(DRAFTER_OPTIONS):
        f = option(f)
    return f


def engine_options(
    backend,
    device,
    weights,
    int8_threshold,
    int8_head,
    cache,
    bits,
    group,
    residual,
    cache_sink,
    mha,
    drafter="none",
    beam_width=EngineOptions.beam_width,
    beam_length=EngineOptions.beam_length,
    lookup=EngineOptions.lookup,
) -> EngineOptions:
    cache = CacheSpec(
        kind=cache, bits=int(bits), group=int(group), residual=residual, sink=cache_sink
    )
    return EngineOptions(
        backend=backend,
        device=device,
        weights=weights,
        int8_threshold=int8_threshold,
        int8_head=int8_head,
        cache=cache,
        mha=mha,
        drafter=None if drafter == "none" else drafter,
        beam_width=beam_width,
        beam_length=beam_length,
        lookup=lookup,
    )


def status(message: str) -> None:
    """Progress for a person watching; silent when stderr is not a terminal."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{message}", err=True, nl=False)


def open_model(model: str, opts: EngineOptions, progress=status):
    """(files, tokenizer, engine) for a model name, path or .gguf; `progress` hears each stage."""
    from xqchat.backends.base import load_model
    from xqchat.models import resolve
    from xqchat.models.catalog import record_use
    from xqchat.models.tokenizer import load_tokenizer

    files = resolve(model)
    progress(f"loading {files.name} …")
    engine = load_model(files, opts)  # first: it validates the weight files
    progress(f"loading the tokenizer of {files.name} …")
    tokenizer = load_tokenizer(files)
    record_use(files.name)
    return files, tokenizer, engine


def load_engine(model: str, **options):
    files, tokenizer, engine = open_model(model, engine_options(**options))
    status("")
    for note in (*engine.spec.notes, *engine.notes):
        click.echo(f"note: {note}", err=True)
    return files, tokenizer, engine


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """Offline chat with open models, with long chats kept small in memory.

    \b
    xqchat                   open the chat app (the same as `xqchat chat`)
    xqchat run PROMPT        one reply to stdout
    xqchat pull MODEL        download a model from the Hugging Face hub
    xqchat list              the models installed (they run offline)
    xqchat show MODEL        a model's spec, files and derived artefacts
    xqchat rm MODEL          delete a pulled model
    xqchat bench ppl|speed   measure quality and speed on this machine
    xqchat train-drafter     train a drafter for faster replies (--drafter auto)
    """
    if ctx.invoked_subcommand is None:
        from .tui.app import run as run_tui

        run_tui()


@cli.command(
    epilog="""
\b
Options given here hold for this session; the settings screen (Ctrl+S) saves them.
Examples:
  xqchat chat
  xqchat chat --cache kv-quant --bits 4
  xqchat chat --cache xquant --mha --overflow drop-oldest
  xqchat chat --drafter auto
"""
)
@model_options
@drafter_options
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=512, help="Most tokens in a reply."
)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0)
@click.option(
    "--overflow",
    type=click.Choice(OVERFLOW_POLICIES),
    default="stop",
    help="When a chat outgrows the context: refuse, drop the oldest turns, or keep the first "
    "tokens plus a recent window.",
)
@click.pass_context
def chat(ctx, **options):
    """Open the chat app: chats, streaming replies, live cache memory and speed."""
    from .tui.app import run as run_tui

    given = {
        name: int(value) if name in ("bits", "group") else value
        for name, value in options.items()
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    run_tui(given)


@cli.command(epilog=EXAMPLES_RUN)
@click.argument("prompt")
@model_options
@drafter_options
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Most tokens in the reply.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0 = greedy (deterministic).",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="Nucleus sampling mass (with --temperature > 0).",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--system", default=None, help="System prompt.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON stats object instead of the text."
)
def run(prompt, max_tokens, temperature, top_p, seed, system, as_json, **engine):
    """Answer PROMPT (or stdin with -) once and exit."""
    from xqchat.backends.chat import ChatSession

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise XQError("the prompt is empty")
    _, tokenizer, model = load_engine(**engine)
    chat = ChatSession(model, tokenizer, system=system)
    cfg = GenerationConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    for event in chat.send(prompt, cfg):
        if not as_json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": chat.messages[-1]["content"],
                    "prompt_tokens": event.prompt_tokens,
                    "new_tokens": event.new_tokens,
                    "decode_tok_s": event.decode_tok_s,
                    "prefill_tok_s": event.prefill_tok_s,
                    "cache_bytes": event.cache_bytes,
                    "fp16_kv_bytes": event.fp16_kv_bytes,
                    "accepted_per_step": event.accepted_per_step,
                    "finish_reason": event.finish_reason,
                },
                indent=2,
            )
        )
    else:
        click.echo()


@cli.command(
    "pull",
    epilog="""
\b
Examples:
  xqchat pull HuggingFaceTB/SmolLM2-360M-Instruct
  xqchat pull Qwen/Qwen2.5-0.5B-Instruct@main
  xqchat pull bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf
""",
)
@click.argument("model")
def pull_command(model):
    """Download a model from the Hugging Face hub.

    It goes into the hub's standard cache (HF_HUB_CACHE). MODEL is NAMESPACE/REPO[@REVISION] (the repo's safetensors) or NAMESPACE/REPO:FILE.gguf (one
    GGUF file). Only what xqchat reads is fetched, and a pull that was interrupted resumes where
    it stopped. The weights are checked; then the model runs offline: xqchat run -m MODEL.
    """
    from xqchat.models.catalog import format_bytes, format_count
    from xqchat.models.pull import pull

    with PullDisplay() as display:
        result = pull(model, display.update)
    about = result.summary
    fetched = f"{format_bytes(result.fetched)} downloaded" if result.fetched else "already here"
    click.echo(
        f"pulled {result.files.name}: {about['arch']}, {format_count(about['parameters'])} "
        f"parameters, {about['format']} ({fetched})"
    )
    for line in [*result.derived, *prepare_xquant(result.files)]:
        click.echo(f"prepared {line}")
    if not about["chat_template"]:
        click.echo("note: it has no chat template, so it cannot chat (bench ppl works)", err=True)
    click.echo(f'run it: xqchat run -m {result.files.name} "Hello"')


def prepare_xquant(files) -> list[str]:
    """XQuant's SVD factors for a GQA model, for the engine this machine picks by default:
    computed once now, so the first chat with an xquant cache starts at once. The models/ layer
    cannot load an engine, so this half of the preparation lives here."""
    import time

    from xqchat.backends.base import load_model
    from xqchat.backends.latents import uses_latents
    from xqchat.models.weights import open_checkpoint

    spec = open_checkpoint(files).spec
    if not uses_latents(spec.dim, spec.kv_dim):
        return []
    status("preparing XQuant's SVD factors (once per model) …")
    start = time.perf_counter()
    engine = load_model(files, EngineOptions())
    engine.new_session(CacheSpec(kind="xquant"))
    status("")
    return [
        f"XQuant SVD factors for {engine.backend} {engine.dtype} weights in "
        f"{time.perf_counter() - start:.1f} s: {engine.module.derived}"
    ]


class PullDisplay:
    """A byte progress bar on stderr while files download, then a status line per stage."""

    def __init__(self):
        self.bar = None

    def update(self, event) -> None:
        from tqdm import tqdm

        if event.stage != "download":
            self.close()
            status("checking the weights …" if event.stage == "verify" else "preparing …")
            return
        if self.bar is None:
            self.bar = tqdm(
                total=event.total, unit="B", unit_scale=True, disable=not sys.stderr.isatty()
            )
        self.bar.set_description_str(event.file, refresh=False)
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        status("")


@cli.command("list", epilog="\b\nExample:\n  xqchat list --json")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_command(as_json):
    """The installed models: each runs offline with xqchat run -m NAME."""
    from xqchat.models.catalog import format_bytes, format_count, listing

    rows = listing()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("NAME", "ARCH", "PARAMS", "SIZE", "FORMAT", "LAST USED")]
    for row in rows:
        table.append(
            (
                row["name"],
                row["architecture"],
                "?" if row["parameters"] is None else format_count(row["parameters"]),
                format_bytes(row["size_bytes"]),
                row["format"],
                (row["last_used"] or "never")[:16],
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        if "error" in row:
            click.echo(f"note: {row['name']}: {row['error']}", err=True)


@cli.command(
    "show",
    epilog="""
\b
Examples:
  xqchat show default
  xqchat show HuggingFaceTB/SmolLM2-360M-Instruct --json
  xqchat show default --int8-stats --text ../shared/data/wikitext2_test.txt
""",
)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option(
    "--int8-stats",
    is_flag=True,
    help="Load MODEL with int8 weights, run a text through it and print, per layer, the input "
    "features that LLM.int8 multiplies in floating point (the outliers).",
)
@click.option(
    "--text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="--int8-stats: the text to run (default: a built-in paragraph).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="--int8-stats: tokens of the text to run.",
)
@click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), default="auto")
@click.option("--int8-threshold", type=click.FloatRange(min=0), default=6.0, show_default=True)
def show_command(model, as_json, int8_stats, text, tokens, backend, int8_threshold):
    """MODEL's spec, files, chat template and derived artefacts.

    MODEL is anything --model takes: default, a pulled NAMESPACE/REPO, a directory or a .gguf.
    """
    from xqchat.models import resolve
    from xqchat.models.catalog import details, format_bytes, format_count

    if int8_stats:
        opts = EngineOptions(backend=backend, weights="int8", int8_threshold=int8_threshold)
        source = text.read_text() if text else benchmarks.INT8_SAMPLE
        _, tokenizer, engine = open_model(model, opts)
        stats = benchmarks.int8_outliers(tokenizer, engine, source, tokens, int8_threshold)
        status("")
        if as_json:
            click.echo(json.dumps(stats, indent=2))
        else:
            for line in benchmarks.format_int8_outliers(stats):
                click.echo(line)
        return
    info = details(resolve(model))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    s = info["spec"]
    lines = [
        ("name", info["name"]),
        ("path", info["path"]),
        (
            "architecture",
            f"{s['arch']}: {s['n_layers']} layers, dim {s['dim']}, {s['n_heads']} heads, "
            f"{s['n_kv_heads']} KV heads of {s['head_dim']}, FFN {s['hidden_dim']}, "
            f"vocab {s['vocab_size']}",
        ),
        ("context", f"{s['max_context']} tokens, RoPE {s['rope_type']} theta {s['rope_theta']:g}"),
        ("parameters", format_count(info["parameters"])),
        ("format", info["format"]),
        ("chat template", "yes" if info["chat_template"] else "no: bench ppl works, chat does not"),
        ("last used", info["last_used"] or "never"),
    ]
    files = [f"{name}  {format_bytes(size)}" for name, size in info["files"].items()]
    for key, values in (("files", files), ("derived", info["derived"] or ["none yet"])):
        lines += [(key if i == 0 else "", value) for i, value in enumerate(values)]
    lines += [("note", note) for note in s["notes"]]
    for key, value in lines:
        click.echo(f"{key:>13}  {value}")


@cli.command("rm")
@click.argument("model")
@click.option("-y", "--yes", is_flag=True, help="Remove without asking.")
def rm_command(model, yes):
    """Delete a pulled model (asks first).

    Removes MODEL's files from the hub cache, and what xqchat derived from it.

    \b
    Example:
      xqchat rm HuggingFaceTB/SmolLM2-360M-Instruct -y
    """
    from xqchat.models.catalog import format_bytes
    from xqchat.models.hub import plan_removal

    removal = plan_removal(model)
    try:
        if not yes and not click.confirm(
            f"remove {removal.name} ({format_bytes(removal.size)})?", err=True
        ):
            click.echo(f"kept {removal.name}", err=True)
            return
    except click.Abort:
        raise XQError("rm asks before deleting: answer y, or pass -y") from None
    removal.run()
    click.echo(f"removed {removal.name} ({format_bytes(removal.size)} freed)")


@cli.group()
def bench():
    """Measure quality (perplexity) and speed on this machine."""


def report(result: dict, engine, as_json: bool) -> None:
    result.update(
        backend=engine.backend,
        device=engine.device,
        weights=engine.dtype,
        weight_bytes=engine.weight_bytes(),
        peak_rss_bytes=benchmarks.peak_rss_bytes(),
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
    help="Plain-text corpus, e.g. WikiText-2 test.",
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
def ppl(text, window, windows, chunk, as_json, **options):
    """Perplexity of a text through the real cache path."""
    _, tokenizer, engine = load_engine(**options)
    result = benchmarks.perplexity(
        engine, tokenizer, text.read_text(), window, windows, chunk, status
    )
    status("")
    report(result, engine, as_json)


@bench.command(
    epilog="""
\b
Examples:
  xqchat bench speed --new-tokens 128 --compare hf
  xqchat bench speed --prompts ../shared/data/mt_bench_questions.jsonl --json
  xqchat bench speed --drafter auto --beam-width 1 --lookup 7
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
    type=click.Choice(["none", "hf", "mlx-lm"]),
    default="none",
    show_default=True,
    help="Also time a baseline on the same weights: transformers' generate (hf) or mlx-lm's, "
    "in bf16 and in our dtype.",
)
@click.option(
    "--profile", is_flag=True, help="Also profile decode steps: time in matmuls vs the rest."
)
@click.option("--json", "as_json", is_flag=True)
def speed(prompts, limit, new_tokens, context, compare, profile, as_json, **options):
    """Prefill and decode speed, greedy, a fixed number of new tokens per prompt."""
    texts = benchmarks.read_prompts(prompts)[:limit]
    files, tokenizer, engine = load_engine(**options)
    rendered = benchmarks.render_prompts(tokenizer, texts, context)
    result = benchmarks.speed(engine, rendered, new_tokens, status)
    if engine.drafter is not None:
        result["beam_width"], result["beam_length"] = engine.beams
        result["lookup"] = engine.lookup
    if profile:
        status("profiling decode steps …")
        result["profile"] = engine.profile_decode(rendered[0], steps=min(new_tokens, 64))
    if compare != "none":
        result["baselines"] = []
        for dtype in dict.fromkeys(["bf16", engine.dtype]):  # the usual setup, and ours
            status(f"timing {compare} ({dtype}) …")
            prefill, decode = baseline_speed(compare, files, tokenizer, dtype, rendered, new_tokens)
            result["baselines"].append(
                {
                    "name": compare,
                    "weights": dtype,
                    "decode_tok_s": decode,
                    "prefill_tok_s": prefill,
                    "decode_speedup": result["decode_tok_s"] / decode,
                    "prefill_speedup": result["prefill_tok_s"] / prefill,
                }
            )
    status("")
    report(result, engine, as_json)


def baseline_speed(name: str, files, tokenizer, dtype: str, rendered, new_tokens: int):
    if name == "hf":
        from xqchat.backends.cuda.reference import hf_model, hf_speed

        return hf_speed(hf_model(files, dtype), rendered, new_tokens)
    from xqchat.backends.mlx.reference import mlx_lm_speed

    return mlx_lm_speed(files, tokenizer, dtype, rendered, new_tokens)


@cli.command(
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
@click.option("--model", "-m", default="default", show_default=True, help="The model to draft for.")
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
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the drafter (default: next to the model, where --drafter auto looks).",
)
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=8), default=160, show_default=True)
@click.option("--beam-length", type=click.IntRange(min=2), default=4, show_default=True)
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

    texts = benchmarks.read_prompts(prompts)[:limit] if prompts else default_prompts(limit)
    options = dict(backend="torch", device="auto", weights="auto")
    options.update(int8_threshold=EngineOptions.int8_threshold, int8_head=True)
    options.update(cache="kv", bits="4")
    options.update(group="128", residual=128, cache_sink=CacheSpec.sink, mha=False)
    files, tokenizer, engine = load_engine(model, **options)
    out = out or derived_dir(files) / "drafter"
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


def describe(error: BaseException) -> tuple[str, int]:
    """One line and an exit code for any error that reaches the top."""
    if isinstance(error, XQError):
        return str(error), 1
    if isinstance(error, click.UsageError):
        return error.format_message(), 2
    if isinstance(error, click.ClickException):
        return error.format_message(), error.exit_code
    if isinstance(error, (KeyboardInterrupt, click.Abort)):
        return "interrupted", 130
    return (
        f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
        1,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=argv, prog_name="xqchat", standalone_mode=False)
        return 0
    except (Exception, KeyboardInterrupt) as e:
        if "--debug" in argv:
            raise
        message, code = describe(e)
    status("")
    click.echo(f"xqchat: error: {' '.join(message.split())}", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
