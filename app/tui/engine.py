"""The TUI's side of the engine. All model work (loading, prefill, generation) runs on one
long-lived thread fed by a queue; the UI awaits results and streams events without blocking."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from xqchat.backends import planner
from xqchat.backends.base import CacheMemory, CacheSpec, GenerationConfig, Model, TokenEvent
from xqchat.backends.chat import ChatSession, Conversation
from xqchat.backends.engine_thread import EngineThread
from xqchat.backends.latents import uses_latents
from xqchat.models.errors import XQError
from xqchat.models.paths import data_dir
from xqchat.models.tokenizer import Tokenizer

from .settings import Settings

Progress = Callable[[str], None]
Loader = Callable[[Settings, Progress], tuple[str, Tokenizer | None, Model]]
KEPT_SESSIONS = 3  # chats whose caches stay in memory, so switching back needs no prefill


def load_model(settings: Settings, progress: Progress) -> tuple[str, Tokenizer | None, Model]:
    """The model the settings name: loaded here, or (backend openai) on the server at their
    url, with the key in OPENAI_API_KEY (`xqchat chat --api-key` sets it for the run)."""
    if settings.backend == "openai":
        from xqchat.backends.remote import RemoteModel

        if not settings.url:
            raise XQError("backend openai needs the server's URL (Settings, Ctrl+S)")
        progress(f"connecting to {settings.url} …")
        model = RemoteModel(settings.url, os.environ.get("OPENAI_API_KEY"), settings.model)
        return model.name, None, model
    from xqchat.app.cli import open_model

    files, tokenizer, model = open_model(settings.model, settings.engine_options(), progress)
    return files.name, tokenizer, model


@dataclass(frozen=True)
class ModelInfo:
    """What the status bar says about the loaded model."""

    name: str
    backend: str
    device: str
    weights: str  # the working dtype of the weights: int8, bf16, fp16, fp32 ("": a server's)
    cache: CacheSpec | None  # None: a server's model (backend openai), whose cache is its own
    drafter: str | None  # how it speculates (auto, lookup, a drafter folder's name), if it does
    max_context: int  # 0: not known (a server's)
    notes: tuple[str, ...]
    # the longest chat these weights and this cache hold in this machine's memory (planner.py);
    # None: not known (a server's model, fp32/fp16 weights)
    fits: int | None = None

    @property
    def local(self) -> bool:
        return self.cache is not None


@dataclass(frozen=True)
class Busy:
    """What the engine is doing for a reply before its first token (loading its saved cache,
    computing XQuant's factors, reading the chat), for the reply block to show. A prefill also
    says how far it is: `done` of `total` tokens read."""

    text: str
    done: int = 0
    total: int | None = None


class PrefillCancelled(Exception):
    """Esc during a long prefill: raised from the prefill's progress hook, between chunks, so a
    cancel does not wait for the whole prompt to be read. What was read stays in the cache (the
    next turn reuses it as a common prefix)."""


def drafter_label(choice: str, model: Model) -> str | None:
    """How the status bar names the drafter: the setting's word, or a drafter folder's name."""
    if getattr(model, "drafter", None) is None:
        return None
    return choice if choice in ("auto", "lookup") else Path(choice).name


@dataclass(frozen=True)
class CacheNote:
    """A chat's saved cache could not be used or written: the chat still works (its next turn
    reads the whole conversation again), but the user should know why it is slower."""

    text: str


class ChatEngine:
    """The model and the chats' sessions. A chat's cache is saved to `saved_dir` after each reply
    and loaded when the chat comes back (after a restart, a settings change or eviction), so its
    next turn prefills only what is new."""

    def __init__(self, loader: Loader = load_model, saved_dir: Path | None = None):
        self.loader = loader
        self.saved_dir = saved_dir or data_dir() / "caches"
        self.thread = EngineThread("xqchat-chat")
        self.model: Model | None = None
        self.tokenizer: Tokenizer | None = None
        self.info: ModelInfo | None = None
        self.sessions: OrderedDict[int, ChatSession] = OrderedDict()
        self.cancel = threading.Event()
        self._loaded_with: Settings | None = None
        self._factored: set[tuple[str, int]] = set()  # xquant caches this model has made

    async def _run(self, fn, *args):
        return await asyncio.wrap_future(self.thread.submit(fn, *args))

    async def configure(self, settings: Settings, progress: Progress) -> ModelInfo:
        """Load the model `settings` name, or reuse the loaded one when only the cache differs
        (new chats' caches then take the new kind; every kind suits every model)."""
        return await self._run(self._configure, settings, progress)

    def _configure(self, settings: Settings, progress: Progress) -> ModelInfo:
        remote = settings.backend == "openai"
        cache = None if remote else settings.engine_options().cache
        old = self._loaded_with
        self.sessions.clear()
        same = old is not None and (old.model, old.url) == (settings.model, settings.url)
        if same and old.engine_options() == dataclasses.replace(
            settings.engine_options(), cache=old.engine_options().cache
        ):
            name = self.info.name
        else:
            self.model = self.tokenizer = self.info = self._loaded_with = None  # free it first
            self._factored.clear()
            name, self.tokenizer, self.model = self.loader(settings, progress)
        self._loaded_with = settings
        model = self.model
        self.info = ModelInfo(
            name,
            model.backend,
            model.device,
            model.dtype,
            cache,
            drafter_label(settings.drafter, model),
            model.spec.max_context,
            (*model.spec.notes, *model.notes),
            planner.fits(model.spec, model.dtype, cache, planner.machine_memory()),
        )
        return self.info

    def _first_factors(self) -> bool:
        """Whether a new session will be the first of this model with this xquant cache: the
        first computes XQuant's SVD factors (or reads them from disk), which takes seconds."""
        cache, spec = self.info.cache, self.model.spec
        if (
            cache is None
            or cache.kind not in ("xquant", "xquant-cl")
            or not uses_latents(spec.dim, spec.kv_dim)
        ):
            return False  # no factors: another cache kind, or an MHA model (it caches X itself)
        key = (cache.kind, cache.group)
        first = key not in self._factored
        self._factored.add(key)
        return first

    def saved_cache(self, chat_id: int) -> Path:
        return self.saved_dir / f"{chat_id}.safetensors"

    def _session(self, chat_id: int, settings: Settings) -> tuple[Conversation, CacheNote | None]:
        """The chat's session, and why its saved cache was refused (if it was). A server's
        model keeps no session here: each turn sends the whole chat."""
        if not self.info.local:
            return self.model.conversation(), None
        chat = self.sessions.pop(chat_id, None)
        note = None
        if chat is None:
            chat = ChatSession(self.model, self.tokenizer, cache=self.info.cache)
            note = self._resume(chat, chat_id)
        self.sessions[chat_id] = chat
        while len(self.sessions) > KEPT_SESSIONS:
            self.sessions.popitem(last=False)
        chat.policy = settings.policy()
        return chat, note

    def _resume(self, chat: ChatSession, chat_id: int) -> CacheNote | None:
        # The loaded tokens are what ChatSession matches the conversation against, so the turn
        # prefills only what follows their longest common prefix with it.
        path = self.saved_cache(chat_id)
        if not path.exists():
            return None
        try:
            chat.session.load(path)  # refused: the session stays empty and reads the whole chat
        except XQError as e:
            return CacheNote(
                f"Reading the chat again from the start: its saved cache was not used ({e})."
            )
        return None

    def _save(self, chat: ChatSession, chat_id: int) -> CacheNote | None:
        try:
            self.saved_dir.mkdir(parents=True, exist_ok=True)
            chat.session.save(self.saved_cache(chat_id))
        except (XQError, OSError) as e:
            return CacheNote(f"Could not save the chat's cache ({e}); reopening it reads it again.")
        return None

    async def reply(
        self,
        chat_id: int,
        messages: list[dict],
        settings: Settings,
        generation: GenerationConfig | None = None,
    ) -> AsyncIterator[list[str] | Busy | TokenEvent | CacheMemory | CacheNote]:
        """Answer `messages` (the chat as the store holds it) with `generation` (default: the
        settings' sampling). Yields a Busy for each stage before the first token (the first as
        soon as the engine thread takes the reply up), the context policy's notices (a list,
        before the first TokenEvent), each TokenEvent, then the cache's memory once the reply is
        done, and a CacheNote whenever the chat's saved cache could not be loaded or saved. The
        cache is saved before the reply counts as done. Esc during the prefill ends the reply
        with no TokenEvent."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        self.cancel.clear()
        cfg = generation or settings.generation()

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def on_prefill(read: int, total: int) -> None:  # on the engine thread, between chunks
            if self.cancel.is_set():
                raise PrefillCancelled
            put(Busy(f"reading the chat ({total:,} tokens) …", read, total))

        def work() -> None:
            chat = None
            try:
                if self.model is None:
                    raise XQError("no model is loaded (Settings, Ctrl+S, picks one)")
                put(Busy("starting the reply …"))
                if chat_id not in self.sessions and self.info.local:
                    if self._first_factors():
                        put(Busy("preparing XQuant factors (first use) …"))
                    if self.saved_cache(chat_id).exists():
                        put(Busy("loading the chat's saved cache …"))
                chat, note = self._session(chat_id, settings)
                if note:
                    put(note)
                chat.messages = messages
                local = isinstance(chat, ChatSession)
                if local:
                    chat.session.on_prefill = on_prefill
                for i, event in enumerate(chat.reply(cfg, self.cancel)):
                    if i == 0:
                        put(list(chat.notices))
                    put(event)
                if local:
                    put(chat.session.memory())
                    if note := self._save(chat, chat_id):
                        put(note)
            except PrefillCancelled:
                pass  # nothing to answer with; the screen says it was cancelled
            except BaseException as e:  # handed to the UI, which shows it as a notification
                put(e)
            finally:
                if isinstance(chat, ChatSession):
                    chat.session.on_prefill = None  # it holds this reply's queue
                put(done)

        self.thread.submit(work)
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def memory(self, chat_id: int) -> CacheMemory | None:
        """What a chat's cache holds now (None when it holds nothing)."""
        chat = self.sessions.get(chat_id)
        return None if chat is None else await self._run(chat.session.memory)

    def delete(self, chat_id: int) -> None:
        """Drop a deleted chat's cache, on disk and in memory. The engine thread drops the session
        before it runs any later reply, so a new chat that takes over the id starts empty."""
        self.saved_cache(chat_id).unlink(missing_ok=True)
        self.thread.submit(self.sessions.pop, chat_id, None)
