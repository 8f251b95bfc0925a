"""The `xqchat` command line. Errors the user can act on are printed as one line on stderr.

The option declarations and the checks made before a model loads are in options.py, the loading
helpers in loading.py, and `bench` and `train-drafter` in bench_cli.py; their names used
elsewhere (open_model, the option lists) are imported here too, so `xqchat.app.cli` still
offers them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from xqchat.backends.base import CacheSpec, EngineOptions, GenerationConfig, pick_backend
from xqchat.backends.chat import OVERFLOW_POLICIES
from xqchat.models.errors import XQError

from . import bench as benchmarks
from .bench_cli import bench, train_drafter
from .doctor import doctor
from .loading import load_engine, note, open_model, status, user_text
from .options import (
    DRAFTER_OPTIONS,
    ENGINE_KEYS,
    ENGINE_OPTIONS,
    MIN_TEMPERATURE,
    SEED_MAX,
    FiniteFloat,
    MemorySize,
    ModelName,
    Preflight,
    Temperature,
    check_device,
    check_drafter,
    check_remote,
    drafter_options,
    engine_options,
    given,
    model_options,
    prepare,
    read_stdin,
    read_text_file,
    remote_options,
)
from .serve_cli import serve

__all__ = ["DRAFTER_OPTIONS", "ENGINE_OPTIONS", "cli", "main", "open_model", "prepare_xquant"]

EXAMPLES_RUN = """
\b
Examples:
  xqchat run "Name three rivers in Europe."
  echo "Summarise: ..." | xqchat run - --max-tokens 200
  xqchat run --temperature 0.7 --top-p 0.9 --seed 1 "Write a haiku"
  xqchat run --json "Hi"          # stats object instead of streamed text
  xqchat run --drafter none "Hi"  # no speculation (on by default: same text, fewer steps)
  xqchat run --overflow sink-window - < long.txt  # too long: keep its start and its end
  xqchat run --backend openai --url http://127.0.0.1:8000/v1 "Hi"  # a server's model

\b
A prompt that is not valid UTF-8 is read with each invalid byte replaced by U+FFFD, and a note
on stderr says how many were.
"""


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
    xqchat serve             the model behind OpenAI's HTTP API, for other programs
    xqchat train-drafter     train a drafter for faster replies (--drafter auto)
    xqchat doctor            what this machine offers, what xqchat uses, and fixes
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
  xqchat chat --drafter none  # no speculation (on by default; --tree fixed: the whole tree)
  xqchat chat --backend openai --url http://127.0.0.1:8000/v1   # xqchat serve, vLLM, ...
  xqchat chat --backend openai --url http://127.0.0.1:11434/v1 -m llama3.2   # Ollama
"""
)
@model_options
@drafter_options
@remote_options
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=512, help="Most tokens in a reply."
)
@click.option(
    "--temperature",
    type=Temperature(max=2),
    default=0.0,
    help=f"0 = greedy; sampling takes {MIN_TEMPERATURE:g} or more.",
)
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0)
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

    if check_remote(ctx, (*ENGINE_KEYS[1:], "overflow")):
        api_key = options.pop("api_key")
        if api_key:  # for this run only: the settings file never holds it
            os.environ["OPENAI_API_KEY"] = api_key
        remote = ("backend", "url", "model", "max_tokens", "temperature", "top_p")
        chosen = {name: options[name] for name in remote if given(ctx, name)}
        run_tui(chosen)
        return
    options.pop("api_key")
    chosen = {
        name: int(value) if name in ("bits", "group") else value
        for name, value in options.items()
        if given(ctx, name)
    }
    # What the command line chose is checked here, so a bad value is one line and not an app
    # that opens on an error; what the saved settings hold is the app's to check.
    engine_options(**{name: options[name] for name in ENGINE_KEYS})
    if chosen.keys() & {"backend", "device"}:
        check_device(pick_backend(options["backend"]), options["device"])
    if "model" in chosen:
        checked = Preflight(options["model"])
        if "drafter" in chosen:
            check_drafter(options["drafter"], checked)
        if "residual" in chosen:
            residual = options["residual"]
            checked.fits_context(residual, f"--residual {residual} is more than")
    run_tui(chosen)


@cli.command(epilog=EXAMPLES_RUN)
@click.argument("prompt")
@model_options
@drafter_options
@remote_options
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Most tokens in the reply.",
)
@click.option(
    "--temperature",
    type=Temperature(),
    default=0.0,
    show_default=True,
    help=f"0 = greedy (deterministic); sampling takes {MIN_TEMPERATURE:g} or more.",
)
@click.option(
    "--top-p",
    type=FiniteFloat(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="Nucleus sampling mass (with --temperature > 0).",
)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None, help="Seed for sampling.")
@click.option("--system", default=None, help="System prompt.")
@click.option(
    "--overflow",
    type=click.Choice(OVERFLOW_POLICIES),
    default="stop",
    show_default=True,
    help="When the prompt and the reply's room outgrow the context: stop = refuse; "
    "drop-oldest = leave out older turns (one prompt has none, so it refuses too); "
    "sink-window = keep the first tokens and the end of the prompt, drop the middle.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON stats object instead of the text."
)
@click.pass_context
def run(
    ctx,
    prompt,
    max_tokens,
    temperature,
    top_p,
    seed,
    system,
    overflow,
    as_json,
    url,
    api_key,
    **engine,
):
    """Answer PROMPT (or stdin with -) once and exit."""
    from xqchat.backends.chat import ChatSession, ContextPolicy

    remote = check_remote(ctx, (*ENGINE_KEYS[1:], "overflow"))
    prompt = user_text(read_stdin() if prompt == "-" else prompt, "the prompt")
    if not prompt.strip():
        raise XQError("the prompt is empty")
    if system is not None:
        system = user_text(system, "the system prompt")
    if remote:
        from xqchat.backends.remote import RemoteModel

        chosen = engine["model"] if given(ctx, "model") else None
        opening = [{"role": "system", "content": system}] if system else []
        chat = RemoteModel(url, api_key, chosen).conversation(opening)
    else:
        checked, opts = prepare(ctx, **engine)
        _, tokenizer, model = load_engine(checked.files, opts)
        policy = ContextPolicy(overflow=overflow)
        chat = ChatSession(model, tokenizer, system=system, policy=policy)
    cfg = GenerationConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if not as_json and hasattr(sys.stdout, "reconfigure"):
        # A reply may hold characters the terminal's encoding lacks: show them as '?', rather
        # than fail mid-reply with UnicodeEncodeError (--json escapes them).
        sys.stdout.reconfigure(errors="replace")
    told = False
    for event in chat.send(prompt, cfg):
        if not told:  # the policy has shaped the prompt by the first token: say what it cut
            told = True
            for line in chat.notices:
                note(line)
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
    engine = load_model(files, EngineOptions(drafter=None))
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
  xqchat show --hardware
  xqchat show default --fit 16GB
""",
)
@click.argument("model", type=ModelName(), required=False, metavar="MODEL")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option(
    "--hardware",
    is_flag=True,
    help="Instead of a model: what this machine's CPU (and GPU) offers and which path each kind "
    "of product takes on it, chosen by timing them here (takes a second or two).",
)
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
@click.option(
    "--fit",
    type=MemorySize(),
    metavar="SIZE",
    help="Plan for SIZE of memory (e.g. 16GB; GB and GiB both mean 2^30 bytes, as laptops' "
    "memory is sold): for each weights x cache choice, the longest chat that fits.",
)
@click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), default="auto")
@click.option("--int8-threshold", type=FiniteFloat(min=0), default=6.0, show_default=True)
@click.pass_context
def show_command(
    ctx, model, as_json, hardware, int8_stats, text, tokens, fit, backend, int8_threshold
):
    """MODEL's spec, files, chat template and derived artefacts; or, with --hardware, this
    machine's.

    MODEL is anything --model takes: default, a pulled NAMESPACE/REPO, a directory or a .gguf.
    """
    from xqchat.models import resolve
    from xqchat.models.catalog import details, format_bytes, format_count

    if hardware:
        if model is not None or int8_stats:
            raise click.UsageError("--hardware takes no MODEL and no --int8-stats")
        show_hardware(backend, as_json)
        return
    if model is None:
        raise click.UsageError("Missing argument 'MODEL' (or give --hardware).")
    if not int8_stats:  # these only steer --int8-stats; given without it, they would do nothing
        for name in ("text", "tokens", "int8_threshold") + (() if hardware else ("backend",)):
            if given(ctx, name):
                option = "--" + name.replace("_", "-")
                raise click.UsageError(f"{option} applies only with --int8-stats")
    if int8_stats:
        opts = EngineOptions(
            backend=backend, weights="int8", int8_threshold=int8_threshold, drafter=None
        )
        source = read_text_file(text, note) if text else benchmarks.INT8_SAMPLE
        checked = Preflight(model)
        checked.engine(opts.backend, opts.device)
        _, tokenizer, engine = open_model(checked.files, opts)
        stats = benchmarks.int8_outliers(tokenizer, engine, source, tokens, int8_threshold)
        status("")
        if as_json:
            click.echo(json.dumps(stats, indent=2))
        else:
            for line in benchmarks.format_int8_outliers(stats):
                click.echo(line)
        return
    if fit is not None:
        show_fit(resolve(model), fit, as_json)
        return
    info = details(resolve(model))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    s = info["spec"]
    sliding = [w for w in s["windows"] if w]
    context = f"{s['max_context']} tokens, RoPE {s['rope_type']} theta {s['rope_theta']:g}"
    if sliding:
        context += (
            f", a {max(sliding)}-token sliding window in {len(sliding)} of {s['n_layers']} layers"
        )
    lines = [
        ("name", info["name"]),
        ("path", info["path"]),
        (
            "architecture",
            f"{s['arch']}: {s['n_layers']} layers, dim {s['dim']}, {s['n_heads']} heads, "
            f"{s['n_kv_heads']} KV heads of {s['head_dim']}, FFN {s['hidden_dim']}, "
            f"vocab {s['vocab_size']}",
        ),
        ("context", context),
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


def show_fit(files, memory: int, as_json: bool) -> None:
    """`show MODEL --fit SIZE`: the planner's table (backends/planner.py)."""
    from xqchat.backends import planner
    from xqchat.models.catalog import format_bytes
    from xqchat.models.weights import open_checkpoint

    spec = open_checkpoint(files).spec
    rows = planner.plan(spec, memory)
    if as_json:
        click.echo(json.dumps({"memory_bytes": memory, "plan": rows}, indent=2))
        return
    click.echo(
        f"{files.name} in {memory / 2**30:g} GiB (of which {format_bytes(planner.RUNTIME_BYTES)} "
        f"for the runtime); the context holds at most {spec.max_context} tokens"
    )
    click.echo(
        f"{'weights':<8} {'cache':<19} {'weights':>9} {'cache/1K tok':>13} {'longest chat':>13}"
    )
    for row in rows:
        tokens = row["tokens"]
        chat = (
            "does not fit"
            if tokens == 0
            else f"{tokens:,}" + (" (all)" if tokens == spec.max_context else "")
        )
        click.echo(
            f"{row['weights']:<8} {row['cache']:<19} {format_bytes(row['weight_bytes']):>9} "
            f"{format_bytes(row['cache_bytes_per_1k_tokens']):>13} {chat:>13}"
        )


def show_hardware(backend: str, as_json: bool) -> None:
    from xqchat.backends.base import hardware

    from .doctor import hardware_lines

    status("measuring this CPU's paths …")
    report = hardware(backend)
    status("")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in hardware_lines(report):
        click.echo(f"{key:>15}  {value}")


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


cli.add_command(bench)
cli.add_command(train_drafter)
cli.add_command(serve)
cli.add_command(doctor)


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
    if isinstance(error, OSError) and error.strerror:
        # the file system or the machine said no (a full disk, a folder made read-only while
        # a command ran): not a bug, and the user can act on it
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}", 1
    if isinstance(error, MemoryError):
        return "out of memory: try a smaller model, --weights int8 or a quantized --cache", 1
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
