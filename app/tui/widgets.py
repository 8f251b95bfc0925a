"""The chat screen's widgets: the prompt, a message (with its busy line), a notice and the status
bar."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Label, LoadingIndicator, Markdown, ProgressBar, Static, TextArea
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from .engine import Busy, ModelInfo
from .store import STATUS_NOTES

WARN_AT, FULL_AT = 0.8, 0.95  # context gauge: warning, then nearly full
LONG_PREFILL = 512  # tokens: a prefill longer than one chunk gets a progress bar


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


class BusyLine(Horizontal):
    """What a reply waits for before its first token (the model loading, XQuant's factors, a long
    prefill), so a reply block is never silently empty: a spinner, the stage, and a progress bar
    while a long prompt is read."""

    def __init__(self, busy: Busy):
        super().__init__(classes="busy")
        self.busy = busy

    def compose(self) -> ComposeResult:
        yield LoadingIndicator()
        yield Label(self.busy.text, classes="busy-text", markup=False)
        yield ProgressBar(show_eta=False)

    def on_mount(self) -> None:
        self.show(self.busy)

    def show(self, busy: Busy) -> None:
        self.busy = busy
        self.query_one(".busy-text", Label).update(busy.text)
        bar = self.query_one(ProgressBar)
        bar.display = busy.total is not None and busy.total > LONG_PREFILL
        if bar.display:
            bar.update(total=busy.total, progress=busy.done)


class MessageView(Vertical, can_focus=True):
    """One message of the conversation. Focus it to copy it or one of its code blocks. A reply
    being streamed shows a BusyLine until its first piece of text."""

    TITLES = {"user": "You", "assistant": "Assistant"}

    def __init__(self, role: str, text: str, status: str = "done", busy: Busy | None = None):
        super().__init__(classes=role)
        self.role, self.text, self.status = role, text, status
        self.body = Markdown(text)
        self.busy_line = BusyLine(busy) if busy is not None else None

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="header")
        if self.busy_line is not None:
            yield self.busy_line
        yield self.body

    def show_busy(self, busy: Busy | None) -> None:
        """Show what the reply waits for, or (None) take the busy line away: text has come."""
        if busy is None:
            if self.busy_line is not None:
                self.busy_line.remove()
                self.busy_line = None
        elif self.busy_line is None:
            self.busy_line = BusyLine(busy)
            self.mount(self.busy_line, before=self.body)
        else:
            self.busy_line.show(busy)

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
    """model · backend/device · weights · cache · drafter · context gauge · cache memory · what
    the machine's memory holds · decode speed. A segment with nothing to say is hidden."""

    SEGMENTS = ("model", "engine", "weights", "cache", "drafter", "gauge", "memory", "fit", "speed")

    def compose(self) -> ComposeResult:
        for name in self.SEGMENTS:
            segment = Static(id=name, markup=False)
            segment.display = False
            yield segment

    def _set(self, name: str, text: str) -> Static:
        segment = self.query_one(f"#{name}", Static)
        segment.update(text)
        segment.display = bool(text)
        return segment

    def _clear(self) -> None:
        """Forget the model: nothing said about it holds while another loads, or none is."""
        for name in self.SEGMENTS[1:]:
            self._set(name, "")

    def show_loading(self, text: str) -> None:
        self._set("model", text).remove_class("-failed")
        self._clear()

    def show_failed(self, model: str) -> None:
        """Loading failed: say so (the notification and the panel say why), not "loading" on."""
        self._set("model", f"{model}: failed to load").add_class("-failed")
        self._clear()

    def show_model(self, info: ModelInfo) -> None:
        """A server's model (backend openai) shows its name and server: its weights and cache
        are its own, and the speed is measured here."""
        cache = "" if info.cache is None else info.cache.kind
        if cache not in ("kv", ""):
            cache += f" {info.cache.bits}-bit"
        self._set("model", info.name).remove_class("-failed")
        self._set("engine", f"{info.backend}/{info.device}")
        self._set("weights", info.weights)
        self._set("cache", cache)
        self._set("drafter", f"drafter: {info.drafter}" if info.drafter else "")

    def show_context(self, used: int, limit: int) -> None:
        share = used / limit if limit else 0.0
        gauge = self._set("gauge", f"ctx {used:,}/{limit:,}")
        gauge.set_class(WARN_AT <= share < FULL_AT, "-warning")
        gauge.set_class(share >= FULL_AT, "-full")

    def show_memory(self, cache_bytes: int, fp16_kv_bytes: int) -> None:
        text = f"cache {size(cache_bytes)}"
        if cache_bytes and fp16_kv_bytes > cache_bytes:
            text += f" ({fp16_kv_bytes / cache_bytes:.1f}× smaller than fp16 KV)"
        self._set("memory", text)

    def show_fit(self, used: int, info: ModelInfo) -> None:
        """Where this machine's memory holds less than the context (planner.py), how much of that
        the chat uses: memory, not the context, is then what ends it."""
        fits = info.fits
        text = ""
        if fits is not None and fits < info.max_context:
            text = f"RAM holds {fits:,} tok: {used / fits:.0%} used" if fits else "RAM: too small"
        self._set("fit", text).set_class(bool(fits) and used >= WARN_AT * fits, "-warning")

    def show_speed(
        self,
        decode_tok_s: float,
        accepted_per_step: float | None,
        speculation: tuple[float, float] | None = None,
    ) -> None:
        """Decode speed; speculating, tokens per model step, and whether speculation pays now:
        the best tree's measured tokens/s over plain decoding's (off: steps are plain)."""
        text = f"{decode_tok_s:.1f} tok/s"
        if accepted_per_step is not None:
            text += f" · {accepted_per_step:.2f} tok/step"
        if speculation is not None:
            gain = speculation[0] / speculation[1]
            text += f" · speculation {'on' if gain > 1 else 'off'} ({gain:.2f}×)"
        self._set("speed", text)

    def clear_speed(self) -> None:
        """Another chat is on screen: the last reply's speed is not this chat's."""
        self._set("speed", "")
