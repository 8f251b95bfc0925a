"""The settings screen: one row per setting, built from the Settings fields themselves."""

from __future__ import annotations

import dataclasses

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Select, Switch

from xqchat.backends.base import CacheSpec

from .pull_screen import PullScreen, pulled_line
from .settings import Settings, installed_models, option

PLANNED = ("model", "weights", "cache", "bits")  # the settings the memory plan depends on


def plan_line(model: str, weights: str, cache: str, bits: int, loaded=None) -> str:
    """One line of the memory planner for the settings screen. Weights `auto` are what the loaded
    engine chose, when it is this model; otherwise the line points to `show --fit`."""
    from xqchat.backends import planner
    from xqchat.models.errors import XQError
    from xqchat.models.registry import resolve
    from xqchat.models.weights import open_checkpoint

    memory = planner.machine_memory()
    if memory <= 0:
        return ""
    gib = memory / 2**30
    try:
        files = resolve(model)
        spec = open_checkpoint(files).spec
    except XQError as e:
        return f"Memory plan: {e}"
    if weights == "auto" and loaded is not None and loaded.name == files.name:
        weights = loaded.weights
    tokens = planner.fits(spec, weights, CacheSpec(cache, bits=bits), memory)
    if tokens is None:
        return f"Memory plan: `xqchat show {model} --fit {gib:.0f}GB` lists every weights x cache"
    kind = cache if cache == "kv" else f"{cache} {bits}-bit"
    held = (
        "not even the weights"
        if tokens == 0
        else "its whole context"
        if tokens == spec.max_context
        else f"a chat of {tokens:,} tokens"
    )
    return (
        f"Memory plan: this machine's {gib:.1f} GiB hold {held} ({weights} weights, {kind} cache)"
    )


class SettingsScreen(Screen):
    """Dismisses with the new Settings when saved, or None."""

    CSS_PATH = "settings_screen.tcss"
    BINDINGS = [
        Binding("escape", "dismiss", "Back", tooltip="Leave without saving."),
        Binding(
            "ctrl+s", "save", "Save", priority=True, tooltip="Save the settings and apply them."
        ),
        Binding("f4", "pull", "Pull model", tooltip="Download a model and pick it."),
    ]

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="form"):
            yield Label("Settings", classes="title")
            for f in dataclasses.fields(Settings):
                opt, value = option(f), getattr(self.settings, f.name)
                with Horizontal(classes=f"row -{opt.where}"):
                    yield Label(opt.label, classes="label")
                    yield self.editor(f.name, opt, value)
                    yield Label(opt.help, classes="help")
            yield Label("", id="plan", classes="-local")
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", variant="primary", id="save")
                yield Button("Cancel (Esc)", id="cancel")
                yield Button("Pull a model (F4)", id="pull")
        yield Footer()

    def on_mount(self) -> None:
        self.show_rows_for(self.settings.backend)
        self.show_plan()

    def show_plan(self) -> None:
        """What this machine's memory holds of the chosen model with the chosen weights and cache
        (planner.py: the figures of `xqchat show MODEL --fit`)."""
        chosen = {name: self.query_one(f"#{name}").value for name in PLANNED}
        loaded = getattr(self.app, "engine", None)
        info = loaded.info if loaded is not None else None
        self.query_one("#plan", Label).update(plan_line(**chosen, loaded=info))

    def show_rows_for(self, backend: str) -> None:
        """Only the settings that mean something for `backend`: a server's model has no local
        cache, weights or drafter here, and a local one no server URL."""
        remote = backend == "openai"
        for row in self.query(".-local"):
            row.display = not remote
        for row in self.query(".-remote"):
            row.display = remote

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "backend":
            self.show_rows_for(event.value)
        if event.select.id in PLANNED:
            self.show_plan()

    @staticmethod
    def editor(name: str, opt, value):
        if isinstance(value, bool):
            return Switch(value, id=name)
        choices = opt.choices or opt.suggest
        if choices is not None:
            values = list(dict.fromkeys([*choices(), value]))  # the current value stays offered
            return Select(
                [(str(v), v) for v in values], value=value, allow_blank=False, compact=True, id=name
            )
        return Input(
            str(value),
            id=name,
            type="number" if not isinstance(value, str) else "text",
            compact=True,
        )

    def values(self) -> dict:
        values = {}
        for f in dataclasses.fields(Settings):
            widget = self.query_one(f"#{f.name}")
            value = widget.value
            if isinstance(widget, Input) and type(f.default) is not str:
                kind = type(f.default)
                try:
                    value = (
                        kind(float(value))
                        if kind is int and float(value).is_integer()
                        else kind(value)
                    )
                except ValueError:
                    raise ValueError(f"{option(f).label}: {value!r} is not a number") from None
            values[f.name] = value
        return values

    def action_save(self) -> None:
        try:
            settings = Settings(**self.values())
        except ValueError as e:
            self.notify(str(e), severity="error")
            return
        self.dismiss(settings)

    def action_pull(self) -> None:
        def pick(pulled) -> None:
            if pulled is not None:
                self.notify(pulled_line(pulled) + " Save to chat with it.", timeout=10)
                name = pulled.files.name
                picker = self.query_one("#model", Select)
                picker.set_options((n, n) for n in dict.fromkeys([*installed_models(), name]))
                picker.value = name

        self.app.push_screen(PullScreen(), pick)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "pull":
            self.action_pull()
        else:
            self.dismiss(None)
