"""Loading a model for a command, and what the command says on stderr meanwhile."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from xqchat.backends.base import EngineOptions
from xqchat.models.registry import ModelFiles

from .options import plural

if TYPE_CHECKING:
    from xqchat.backends.base import Model
    from xqchat.models.tokenizer import Tokenizer


def status(message: str) -> None:
    """Progress for a person watching; silent when stderr is not a terminal."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{message}", err=True, nl=False)


def note(message: str) -> None:
    """One line on stderr that the user should read; stdout stays the command's output."""
    click.echo(f"note: {message}", err=True)


def open_model(
    model: str | ModelFiles, opts: EngineOptions, progress: Callable[[str], None] = status
) -> tuple[ModelFiles, Tokenizer, Model]:
    """(files, tokenizer, engine) for a model name, path or .gguf, or files already resolved;
    `progress` hears each stage."""
    from xqchat.backends.base import load_model
    from xqchat.models import resolve
    from xqchat.models.catalog import record_use
    from xqchat.models.tokenizer import load_tokenizer

    files = model if isinstance(model, ModelFiles) else resolve(model)
    progress(f"loading {files.name} …")
    engine = load_model(files, opts)  # first: it validates the weight files
    progress(f"loading the tokenizer of {files.name} …")
    tokenizer = load_tokenizer(files)
    record_use(files.name)
    return files, tokenizer, engine


def load_engine(files: ModelFiles, opts: EngineOptions) -> tuple[ModelFiles, Tokenizer, Model]:
    files, tokenizer, engine = open_model(files, opts)
    status("")
    for line in (*engine.spec.notes, *engine.notes):
        note(line)
    return files, tokenizer, engine


def user_text(text: str, what: str) -> str:
    """Text from argv or stdin, each byte that was not valid UTF-8 replaced by U+FFFD (the rest
    is kept, and a note says how many were replaced)."""
    from xqchat.models.tokenizer import valid_text

    text, replaced = valid_text(text)
    if replaced:
        note(f"{what} is not valid UTF-8: {plural(replaced, 'invalid byte')} replaced by U+FFFD")
    return text
