"""The chat screen's replies: sending a turn to the engine under the chat's answer lock, showing
what the engine is busy with until the first token, streaming the reply into the conversation and
the store, and how Ctrl+R samples."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass

from textual import work
from textual.screen import Screen
from textual.widgets.markdown import MarkdownStream

from xqchat.backends.base import CacheMemory, GenerationConfig, TokenEvent
from xqchat.models.errors import XQError

from .chat_lock import ANSWERED_ELSEWHERE, ChatLock, lock_dir
from .engine import Busy, CacheNote
from .settings import Settings
from .store import SAVE_EVERY_S, ReplyWriter, Store
from .widgets import MessageView, NoticeView, StatusBar

# Ctrl+R at temperature 0 (the default: greedy) would write the very same reply again, so a
# regenerated reply is sampled: at the settings' temperature when it is above 0, else at this one
# (a common middle ground: varied, still on topic), with a new seed each time.
REGENERATE_TEMPERATURE = 0.7
REGENERATE_HELP = (  # short: the help screen shows one line of it
    f"Answer again, sampled (temperature {REGENERATE_TEMPERATURE} if yours is 0, a new seed)."
)


def regenerate_config(settings: Settings) -> GenerationConfig:
    """How Ctrl+R samples (see REGENERATE_TEMPERATURE); top-p and max tokens as set."""
    cfg = settings.generation()
    temperature = cfg.temperature if cfg.temperature > 0 else REGENERATE_TEMPERATURE
    return dataclasses.replace(cfg, temperature=temperature, seed=secrets.randbits(31))


@dataclass
class Reply:
    """The reply being streamed, and where it shows (if its chat is on screen). It holds the
    chat's answer lock until it ends."""

    chat_id: int
    writer: ReplyWriter
    lock: ChatLock
    generation: GenerationConfig | None = None  # None: the settings' sampling
    view: MessageView | None = None
    stream: MarkdownStream | None = None
    busy: Busy | None = Busy("starting the reply …")  # None once text has come
    started: bool = False  # the engine thread has taken it up (loading stages no longer apply)


class ReplyingScreen(Screen):
    """The half of the chat screen that answers: ChatScreen adds the chats and the actions."""

    def __init__(self) -> None:
        super().__init__()
        self.chat_id: int | None = None
        self.reply: Reply | None = None
        self.loading_stage: str | None = None  # what the model's loading is doing, if it is

    @property
    def store(self) -> Store:
        return self.app.store

    def busy(self) -> bool:
        """Whether a reply is streaming (said in a notification, as the caller then does nothing)."""
        if self.reply is not None:
            self.notify(
                "A reply is still streaming: wait for it, or press Esc to cancel it.",
                severity="warning",
            )
        return self.reply is not None

    # -- the answer lock ---------------------------------------------------------------------------
    def claim(self, chat_id: int) -> ChatLock | None:
        """The chat's answer lock, or None (said in one line) while another xqchat answers it:
        the caller then sends nothing and leaves the user's text where it is."""
        lock = ChatLock(lock_dir(self.store.path), chat_id)
        if lock.acquire():
            return lock
        self.notify(ANSWERED_ELSEWHERE, severity="warning")
        return None

    def shown_differs(self) -> bool:
        """Whether the conversation on screen is not the chat the store holds (another xqchat
        window answered it meanwhile)."""
        stored = [(m.role, m.content) for m in self.store.messages(self.chat_id)]
        shown = [(v.role, v.text) for v in self.query(MessageView)]
        return [m for m in stored if m[0] != "notice"] != shown

    # -- loading (driven by the app) -------------------------------------------------------------
    def follow_loading(self, stage: str | None) -> None:
        """A reply sent while the model loads waits for it: its block says what loading does."""
        self.loading_stage = stage
        reply = self.reply
        if stage is not None and reply is not None and not reply.started:
            reply.busy = Busy(stage)
            if reply.view is not None:
                reply.view.show_busy(reply.busy)

    # -- sending and streaming ---------------------------------------------------------------------
    def history(self, chat_id: int) -> list[dict]:
        """The chat as the model sees it: system prompt, then user and assistant messages."""
        system = self.store.chat(chat_id).system
        messages = [{"role": "system", "content": system}] if system else []
        for message in self.store.messages(chat_id):
            if message.role in ("user", "assistant"):
                messages.append({"role": message.role, "content": message.content})
        return messages

    def start_reply(self, lock: ChatLock, generation: GenerationConfig | None = None) -> None:
        """Answer the chat on screen; `lock` (its answer lock, held) is released when it ends."""
        reply = Reply(self.chat_id, ReplyWriter(self.store, self.chat_id), lock, generation)
        if self.loading_stage is not None:
            reply.busy = Busy(self.loading_stage)
        self.reply = reply
        self.stream_reply(reply)

    async def attach(self, reply: Reply) -> None:
        """Show the streaming reply, with what it has so far (or what it waits for), at the end
        of the conversation."""
        view = MessageView("assistant", "", "streaming", busy=reply.busy)
        await self.query_one("#conversation").mount(view)
        if reply.writer.text:
            await view.body.update(reply.writer.text)
        if reply is not self.reply or reply.chat_id != self.chat_id:  # moved on meanwhile
            await view.remove()
            return
        view.text = reply.writer.text
        reply.view, reply.stream = view, view.stream()

    async def show_notice(self, reply: Reply, note: str) -> None:
        self.store.add(reply.chat_id, "notice", note)
        if reply.view is not None:
            await self.query_one("#conversation").mount(NoticeView(note), before=reply.view)

    @work(group="reply")
    async def stream_reply(self, reply: Reply) -> None:
        try:
            await self._stream(reply)
        finally:  # however it ends (the app closing included), the chat may be answered again
            reply.lock.release()

    async def _stream(self, reply: Reply) -> None:
        status, finish, problem = self.query_one(StatusBar), None, None
        await self.attach(reply)
        saver = self.set_interval(SAVE_EVERY_S, reply.writer.flush)
        history = self.history(reply.chat_id)  # read under the lock: in order, whoever wrote it
        engine = self.app.engine
        try:
            async for item in engine.reply(
                reply.chat_id, history, self.app.settings, reply.generation
            ):
                if isinstance(item, Busy):
                    reply.started, reply.busy = True, item
                    if reply.view is not None:
                        reply.view.show_busy(item)
                elif isinstance(item, list):
                    for note in item:
                        await self.show_notice(reply, note)
                elif isinstance(item, CacheNote):
                    self.notify(item.text, title="chat cache", severity="warning", timeout=10)
                elif isinstance(item, TokenEvent):
                    reply.writer.add(item.text)
                    finish, reply.busy = item.finish_reason, None
                    if reply.view is not None:
                        reply.view.show_busy(None)
                        reply.view.text = reply.writer.text
                        await reply.stream.write(item.text)
                        status.show_speed(
                            item.decode_tok_s, item.accepted_per_step, item.speculation
                        )
                        if engine.info.local:
                            status.show_memory(item.cache_bytes, item.fp16_kv_bytes)
                            used = item.cached_tokens + item.prompt_tokens + item.new_tokens
                            status.show_context(used, engine.info.max_context)
                            status.show_fit(used, engine.info)
                elif isinstance(item, CacheMemory) and reply.chat_id == self.chat_id:
                    self.show_cache(item)
            ended = {None: "done", "stop": "done"}.get(finish, finish)
        except asyncio.CancelledError:  # the app is closing mid-reply: keep what came
            reply.writer.finish("interrupted")
            raise
        except XQError as e:
            ended, problem = "error", str(e)
        except Exception as e:  # a bug: say so, without a traceback on screen
            ended, problem = "error", f"internal error: {type(e).__name__}: {e}"
        finally:
            saver.stop()
        if problem:
            self.notify(problem, severity="error", timeout=10)
        elif reply.writer.id is None and engine.cancel.is_set():
            self.notify(
                "Cancelled before the reply began: your message is kept (Ctrl+R answers it)."
            )
        reply.writer.finish(ended)
        if reply.stream is not None:
            await reply.stream.stop()
        if reply.writer.id is None and problem:  # no reply at all: say why in the conversation
            await self.show_notice(reply, f"no reply: {problem}")
        if reply.view is not None:
            if reply.writer.id is None:
                await reply.view.remove()
            else:
                reply.view.set_status(ended)
        self.reply = None
        self.refresh_chats()

    def show_cache(self, memory: CacheMemory) -> None:
        """The gauge and memory figures of the chat on screen, from what its cache holds."""
        if not self.app.engine.info.local:  # a server's cache is its own
            return
        status = self.query_one(StatusBar)
        status.show_context(memory.tokens, self.app.engine.info.max_context)
        status.show_memory(memory.cache_bytes, memory.fp16_kv_bytes)
        status.show_fit(memory.tokens, self.app.engine.info)

    def refresh_chats(self) -> None:
        """A reply moves its chat to the top of the sidebar: ChatScreen, which has one, lists it
        again."""
