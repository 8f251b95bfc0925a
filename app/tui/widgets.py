"""The chat screen's widgets: the prompt, a message, a notice and the status bar."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Label, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from .engine import ModelInfo
from .store import STATUS_NOTES

WARN_AT, FULL_AT = 0.8, 0.95  # context gauge: warning, then nearly full


class PromptInput(TextArea):
    """A multi-line prompt: Enter sends, Shift+Enter or Ctrl+J starts a new line."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
        elif event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
        else:
            await super()._on_key(event)


class MessageView(Vertical, can_focus=True):
    """One message of the conversation. Focus it to copy it or one of its code blocks."""

    TITLES = {"user": "You", "assistant": "Assistant"}

    def __init__(self, role: str, text: str, status: str = "done"):
        super().__init__(classes=role)
        self.role, self.text, self.status = role, text, status
        self.body = Markdown(text)

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="header")
        yield self.body

    @property
    def title(self) -> str:
        note = STATUS_NOTES.get(self.status)
        return self.TITLES[self.role] + (f" · {note}" if note else "")

    def on_mount(self) -> None:
        self.set_class(self.status in STATUS_NOTES, "-partial")

    def set_status(self, status: str) -> None:
        self.status = status
        self.query_one(".header", Label).update(self.title)
        self.set_class(status in STATUS_NOTES, "-partial")

    def stream(self) -> MarkdownStream:
        return Markdown.get_stream(self.body)

    def code_blocks(self) -> list[str]:
        return [fence.code for fence in self.query(MarkdownFence)]


class NoticeView(Static):
    """What the context policy did, said in the conversation."""


def size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 // 10 else f"{n / 2**10:.0f} KiB"


class StatusBar(Horizontal):
    """model · backend/device · cache · context gauge · cache memory · decode speed."""

    def compose(self) -> ComposeResult:
        for name in ("model", "engine", "cache", "gauge", "memory", "speed"):
            yield Static(id=name)

    def show_loading(self, text: str) -> None:
        self.query_one("#model", Static).update(text)

    def show_model(self, info: ModelInfo) -> None:
        cache = info.cache.kind
        if cache != "kv":
            cache += f" {info.cache.bits}-bit"
        self.query_one("#model", Static).update(info.name)
        self.query_one("#engine", Static).update(f"{info.backend}/{info.device}")
        self.query_one("#cache", Static).update(cache)

    def show_context(self, used: int, limit: int) -> None:
        share = used / limit if limit else 0.0
        gauge = self.query_one("#gauge", Static)
        gauge.update(f"ctx {used:,}/{limit:,}")
        gauge.set_class(WARN_AT <= share < FULL_AT, "-warning")
        gauge.set_class(share >= FULL_AT, "-full")

    def show_memory(self, cache_bytes: int, fp16_kv_bytes: int) -> None:
        text = f"cache {size(cache_bytes)}"
        if cache_bytes and fp16_kv_bytes > cache_bytes:
            text += f" ({fp16_kv_bytes / cache_bytes:.1f}× smaller than fp16 KV)"
        self.query_one("#memory", Static).update(text)

    def show_speed(self, decode_tok_s: float, accepted_per_step: float | None) -> None:
        text = f"{decode_tok_s:.1f} tok/s"
        if accepted_per_step is not None:
            text += f" · {accepted_per_step:.2f} tok/step (drafter)"
        self.query_one("#speed", Static).update(text)
