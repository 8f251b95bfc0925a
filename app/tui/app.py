"""The xqchat TUI: `xqchat` (or `xqchat chat`) opens it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from xqchat.models.errors import XQError

from . import settings as settings_file
from .chat_screen import ChatScreen
from .dialogs import ConfirmScreen, HelpScreen
from .engine import ChatEngine, Loader, load_model
from .pull_screen import PullScreen, pulled_line
from .settings import Settings
from .settings_screen import SettingsScreen
from .store import Store

PROMPT_KEYS = [  # handled by the prompt itself, not by bindings
    ("enter", "Send", "Send the message (or the edited message)."),
    ("shift+enter,ctrl+j", "New line", "Start a new line in the message."),
]


class XQChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "xqchat"
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="List every key."),
        Binding(
            "ctrl+s", "settings", "Settings", tooltip="Model, cache, sampling, context policy."
        ),
        Binding(
            "f4",
            "pull",
            "Pull model",
            show=False,
            tooltip="Download a model from the Hugging Face hub (as `xqchat pull` does).",
        ),
        Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Quit xqchat."),
    ]

    def __init__(self, overrides: dict | None = None, loader: Loader = load_model) -> None:
        super().__init__()
        self.settings_path = settings_file.default_path()
        self.settings, self.settings_problem = settings_file.load(self.settings_path)
        try:  # options given on the command line hold for this run; Settings saves them
            self.settings = dataclasses.replace(self.settings, **(overrides or {}))
        except ValueError as e:
            raise XQError(str(e)) from None
        self.store = Store()
        self.engine = ChatEngine(loader)

    @property
    def chat_screen(self) -> ChatScreen:
        return self.get_screen("chat")

    async def on_mount(self) -> None:
        self.install_screen(ChatScreen(), "chat")
        await self.push_screen("chat")
        if self.settings_problem:
            self.notify(self.settings_problem, severity="warning", timeout=15)
        if self.store.recovery is not None:  # long enough to note where the old file went
            self.notify(
                self.store.recovery.notice, title="chat store", severity="warning", timeout=60
            )
        self.load_model()

    def on_unmount(self) -> None:
        self.engine.cancel.set()
        self.store.close()

    @work(exclusive=True, group="load")
    async def load_model(self) -> None:
        screen = self.chat_screen
        screen.show_loading(f"loading {self.settings.model} …")

        def progress(stage: str) -> None:  # called on the engine thread
            self.call_from_thread(screen.show_loading, stage)

        try:
            info = await self.engine.configure(self.settings, progress)
        except XQError as e:
            screen.show_loading(None)
            if self.engine.model is None:
                screen.show_no_model(str(e))
            self.notify(str(e), severity="error", timeout=15)
            return
        except Exception as e:  # a bug: say so, without a traceback on screen
            screen.show_loading(None)
            self.notify(f"internal error: {type(e).__name__}: {e}", severity="error", timeout=15)
            return
        screen.show_loading(None)
        screen.show_model(info)
        for note in info.notes:
            self.notify(note, title="note", timeout=10)

    def apply_settings(self, new: Settings) -> bool:
        """Save `new` and load what it changed. False (and a notice) if it could not be saved:
        it still holds for this run."""
        try:
            settings_file.save(new, self.settings_path)
            saved = True
        except OSError as e:  # a file in the config folder's place, no permission, disk full
            saved = False
            self.notify(
                f"Cannot save the settings to {self.settings_path}: {settings_file.reason(e)}. "
                "They hold until xqchat quits.",
                severity="error",
                timeout=15,
            )
        old, self.settings = self.settings, new
        if new.engine_options() != old.engine_options() or new.model != old.model:
            self.load_model()
        return saved

    def action_settings(self) -> None:
        def apply(new: Settings | None) -> None:
            if new is not None and self.apply_settings(new):
                self.notify("Settings saved.")

        self.push_screen(SettingsScreen(self.settings), apply)

    def action_pull(self) -> None:
        def pulled(result) -> None:
            if result is None:
                return
            self.notify(pulled_line(result), timeout=10)
            name = result.files.name

            def switch(yes: bool) -> None:
                if yes:
                    self.apply_settings(dataclasses.replace(self.settings, model=name))

            self.push_screen(ConfirmScreen(f"Chat with {name} now?"), switch)

        self.push_screen(PullScreen(), pulled)

    def keys(self) -> list[tuple[str, str, str]]:
        """(key, action, what it does) for every binding, for the help screen."""
        palette = Binding("ctrl+p", "command_palette", "Commands", tooltip="Every action by name.")
        bindings = [Binding(keys, "", name, tooltip=doc) for keys, name, doc in PROMPT_KEYS]
        bindings += [*ChatScreen.BINDINGS, *self.BINDINGS, palette]
        return [
            (
                " ".join(self.get_key_display(Binding(key, "")) for key in b.key.split(",")),
                b.description,
                b.tooltip,
            )
            for b in bindings
        ]

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.keys()))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if not isinstance(screen, ChatScreen):
            return
        for binding in ChatScreen.BINDINGS:
            yield SystemCommand(
                binding.description, binding.tooltip, lambda b=binding: screen.run_action(b.action)
            )
        for binding in self.BINDINGS:
            yield SystemCommand(
                binding.description, binding.tooltip, lambda b=binding: self.run_action(b.action)
            )


def run(overrides: dict | None = None) -> None:
    XQChatApp(overrides).run()
