"""Small modal screens: help, confirm, a line of text, a pick from a list."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, OptionList


class Dialog(ModalScreen):
    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape", "dismiss", "Close")]


class HelpScreen(Dialog):
    """Every key binding, as the app defines them."""

    def __init__(self, keys: list[tuple[str, str, str]]):
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help"):
            yield Label(
                "Keys  (Ctrl+P opens the command palette with every action)", classes="title"
            )
            table = DataTable(cursor_type="row", zebra_stripes=True)
            table.add_columns("key", "action", "what it does")
            table.add_rows(self.keys)
            yield table
            yield Label("Esc closes this screen", classes="hint")


class ConfirmScreen(Dialog):
    """A yes/no question; dismisses with True for yes."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="title")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPrompt(Dialog):
    """One line of text; Enter dismisses with it, Esc with None."""

    def __init__(self, title: str, value: str = "", placeholder: str = ""):
        super().__init__()
        self.title_text, self.value, self.placeholder = title, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield Input(self.value, placeholder=self.placeholder)
            yield Label("Enter to accept · Esc to cancel", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)


class PickScreen(Dialog):
    """Pick one of several items; dismisses with its index, or None."""

    def __init__(self, title: str, items: list[str]):
        super().__init__()
        self.title_text, self.items = title, items

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield OptionList(*self.items)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option_index)
