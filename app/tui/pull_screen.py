"""Pull a model from the Hugging Face hub without leaving the app: `xqchat pull` on a worker
thread, with its progress on a bar."""

from __future__ import annotations

import threading

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Label, ProgressBar

from xqchat.models.catalog import format_bytes
from xqchat.models.errors import XQError
from xqchat.models.hub import NAME_FORMS
from xqchat.models.pull import Pulled, PullProgress, pull
from xqchat.models.registry import SUGGESTED_PULL

from .dialogs import Dialog

STAGES = {"verify": "checking that it loads …", "prepare": "preparing what the engine derives …"}


class Cancelled(Exception):
    """Raised from the progress callback to stop a pull; its partial file stays for a resume."""


class PullScreen(Dialog):
    """Asks for a model name and pulls it; dismisses with what was pulled, or None."""

    BINDINGS = [Binding("escape", "stop", "Cancel")]

    def __init__(self):
        super().__init__()
        self.cancel = threading.Event()
        self.pulling = False

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="pull"):
            yield Label("Pull a model from the Hugging Face hub", classes="title")
            yield Input(placeholder=f"e.g. {SUGGESTED_PULL}")
            yield ProgressBar(total=None, show_eta=False)
            yield Label(f"{NAME_FORMS}", id="stage", classes="hint")
            yield Label("Enter pulls · Esc cancels (pulling it again resumes)", classes="hint")

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not self.pulling:
            self.start(event.value.strip())

    def start(self, name: str) -> None:
        self.pulling = True
        self.query_one(Input).disabled = True
        self.query_one(ProgressBar).display = True
        self.query_one("#stage", Label).update(f"asking the hub about {name} …")
        self.run_pull(name)

    def show(self, event: PullProgress) -> None:
        bar, stage = self.query_one(ProgressBar), self.query_one("#stage", Label)
        if event.stage == "download" and event.total:
            bar.update(total=event.total, progress=event.done)
            stage.update(
                f"{event.file} · {format_bytes(event.done)} of {format_bytes(event.total)}"
            )
        else:
            stage.update(STAGES.get(event.stage, event.stage))

    def failed(self, problem: str) -> None:
        self.notify(problem, severity="error", timeout=15)
        self.pulling = False
        self.query_one(ProgressBar).display = False
        self.query_one("#stage", Label).update(NAME_FORMS)
        field = self.query_one(Input)
        field.disabled = False
        field.focus()

    def cancelled(self, name: str) -> None:
        self.notify(f"Pull of {name} cancelled: pulling it again resumes it.", timeout=10)
        self.dismiss(None)

    @work(thread=True, exclusive=True)
    def run_pull(self, name: str) -> None:
        def progress(event: PullProgress) -> None:
            if self.cancel.is_set():
                raise Cancelled
            self.app.call_from_thread(self.show, event)

        try:
            pulled = pull(name, progress)
        except Cancelled:
            self.app.call_from_thread(self.cancelled, name)
        except XQError as e:
            self.app.call_from_thread(self.failed, str(e))
        except Exception as e:  # a bug: say so, without a traceback on screen
            self.app.call_from_thread(self.failed, f"internal error: {type(e).__name__}: {e}")
        else:
            self.app.call_from_thread(self.dismiss, pulled)

    def action_stop(self) -> None:
        if self.pulling:
            self.cancel.set()  # the pull stops at its next chunk, then the dialog closes
            self.query_one("#stage", Label).update("cancelling …")
        else:
            self.dismiss(None)


def pulled_line(pulled: Pulled) -> str:
    """What the app says once a pull is done."""
    about = pulled.summary
    got = f"{format_bytes(pulled.fetched)} downloaded" if pulled.fetched else "already here"
    return f"Pulled {pulled.files.name}: {about['arch']}, {about['format']} ({got})."
