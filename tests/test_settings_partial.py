"""settings.json: one bad setting resets only itself, and the warning names it and what it became;
the file as found is kept beside, never overwritten; settings that cannot be saved are said, not
a crash."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tui_fakes import app_with, settle

from xqchat.app.tui import settings as settings_file
from xqchat.app.tui.settings import Settings
from xqchat.app.tui.settings_screen import SettingsScreen

SIZE = (110, 32)

# (what the file holds, the settings kept from it, what the warning names, in the file's order)
PARTIAL = [
    (
        {"temperature": "hot", "max_tokens": 64},
        {"max_tokens": 64},
        ["temperature: expected float, got 'hot' (reset to 0.0)"],
    ),
    (
        {"top_p": 1.5, "cache": "xquant", "bits": 5, "temperature": 0.7},
        {"cache": "xquant", "temperature": 0.7},
        [
            "top_p: 1.5 is outside 0.01..1 (reset to 1.0)",
            "bits: 5 is not one of 2, 3, 4, 8 (reset to 4)",
        ],
    ),
    (
        {"colour": 1, "model": "my/model"},
        {"model": "my/model"},
        ["'colour': unknown setting (dropped)"],
    ),
    (
        {"max_tokens": 512.5, "int8_head": 1, "overflow": "drop-oldest"},
        {"overflow": "drop-oldest"},
        [
            "max_tokens: expected int, got 512.5 (reset to 512)",
            "int8_head: expected bool, got 1 (reset to True)",
        ],
    ),
    (
        {"window": -3, "sink": 8, "drafter": " "},
        {"sink": 8},
        ["window: -3 is outside 0..∞ (reset to 0)", "drafter: empty (reset to 'auto')"],
    ),
    (
        {"mha": True, "weights": "int8", "backend": "tpu", "temperature": None},
        {"mha": True, "weights": "int8"},
        [
            "backend: 'tpu' is not one of auto, torch, mlx, openai (reset to 'auto')",
            "temperature: expected float, got None (reset to 0.0)",
        ],
    ),
    (
        {"temperature": 1e-300, "top_p": float("inf"), "max_tokens": 64},
        {"max_tokens": 64},
        [
            "temperature: 1e-300 is too small: use 0 (greedy) or at least 0.001 (reset to 0.0)",
            "top_p: inf is not a finite number (reset to 1.0)",
        ],
    ),
]


def test_a_nan_setting_is_reset_and_named(tmp_path):
    """NaN passes every range check by comparison (and NaN != NaN, so it has its own test)."""
    path = tmp_path / "settings.json"
    path.write_text('{"temperature": NaN, "max_tokens": 64}')
    settings, problem = settings_file.load(path)
    assert settings == Settings(max_tokens=64)
    assert "temperature: nan is not a finite number (reset to 0.0)" in problem


def saved(path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(("data", "kept", "named"), PARTIAL)
def test_a_bad_setting_resets_only_itself_and_is_named(tmp_path, data, kept, named):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data))
    settings, problem = settings_file.load(path)
    assert settings == Settings(**kept)
    assert problem == (
        f"{path} was broken in part: {'; '.join(named)}. Kept the other settings "
        "(old file: settings.json.broken)"
    )
    assert json.loads((tmp_path / "settings.json.broken").read_text()) == data
    assert saved(path) == {"version": 2, **kept}  # repaired in place: what was chosen
    assert settings_file.load(path) == (Settings(**kept), None)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("[]", "not a JSON object"),
        ('"model"', "not a JSON object"),
        (
            "{not json",
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        ("", "Expecting value: line 1 column 1 (char 0)"),
    ],
)
def test_a_file_that_is_no_settings_at_all_gives_the_defaults(tmp_path, content, why):
    path = tmp_path / "settings.json"
    path.write_text(content)
    assert settings_file.load(path) == (
        Settings(),
        f"{path} was broken ({why}); using the defaults (old file: settings.json.broken)",
    )
    assert (tmp_path / "settings.json.broken").read_text() == content
    assert saved(path) == {"version": 2}


def test_a_file_that_is_not_utf8_gives_the_defaults_and_is_kept(tmp_path):
    path = tmp_path / "settings.json"
    path.write_bytes(b'{"model": "\xff"}')
    settings, problem = settings_file.load(path)
    assert settings == Settings()
    assert problem.startswith(f"{path} was broken ('utf-8' codec can't decode byte 0xff")
    assert (tmp_path / "settings.json.broken").read_bytes() == b'{"model": "\xff"}'


def test_a_folder_in_place_of_the_file_is_moved_aside_whole(tmp_path):
    path = tmp_path / "settings.json"
    (path / "mine").mkdir(parents=True)
    assert settings_file.load(path) == (
        Settings(),
        f"{path} was broken (Is a directory); using the defaults (old file: settings.json.broken)",
    )
    assert (tmp_path / "settings.json.broken" / "mine").is_dir()
    assert saved(path) == {"version": 2}


def test_an_older_broken_file_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_file.time, "strftime", lambda _: "20250101-120000")
    path = tmp_path / "settings.json"
    (tmp_path / "settings.json.broken").write_text("first")
    (tmp_path / "settings.json.broken-20250101-120000").write_text("second")
    path.write_text('{"bits": 7}')
    settings, problem = settings_file.load(path)
    assert problem == (
        f"{path} was broken in part: bits: 7 is not one of 2, 3, 4, 8 (reset to 4). Kept the "
        "other settings (old file: settings.json.broken-20250101-120000-2)"
    )
    assert (tmp_path / "settings.json.broken").read_text() == "first"
    assert (tmp_path / "settings.json.broken-20250101-120000").read_text() == "second"
    assert (tmp_path / "settings.json.broken-20250101-120000-2").read_text() == '{"bits": 7}'


async def test_the_app_keeps_the_good_settings_and_warns_of_the_bad(default_tokenizer, dirs):
    path = dirs / "config" / "xqchat" / "settings.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"temperature": "hot", "max_tokens": 64, "cache": "kv-quant"}))
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.settings == Settings(max_tokens=64, cache="kv-quant")
        warnings = [(n.message, n.severity) for n in app._notifications if "settings" in n.message]
        assert warnings == [
            (
                f"{path} was broken in part: temperature: expected float, got 'hot' (reset to "
                "0.0). Kept the other settings (old file: settings.json.broken)",
                "warning",
            )
        ]
        assert app.chat_screen.query_one("#cache").render() == "kv-quant 4-bit"


async def test_settings_that_cannot_be_saved_are_said_and_hold_for_the_run(default_tokenizer, dirs):
    folder = dirs / "config" / "xqchat"
    folder.parent.mkdir(parents=True)
    folder.write_text("a file where the config folder belongs")
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.settings == Settings() and app.settings_problem is None
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature").value = "0.7"
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert app.settings == Settings(temperature=0.7)
        messages = [(n.message, n.severity) for n in app._notifications]
        assert messages[-1] == (
            f"Cannot save the settings to {folder / 'settings.json'}: File exists. They hold "
            "until xqchat quits.",
            "error",
        )
        assert "Settings saved." not in [message for message, _ in messages]
    assert folder.read_text() == "a file where the config folder belongs"


def test_only_changed_settings_are_saved_so_new_defaults_reach_the_rest(tmp_path):
    path = tmp_path / "settings.json"
    settings_file.save(Settings(temperature=0.7, drafter="none"), path)
    assert saved(path) == {"version": 2, "temperature": 0.7, "drafter": "none"}
    assert settings_file.load(path) == (Settings(temperature=0.7, drafter="none"), None)


def test_a_file_saved_whole_before_keeps_only_what_was_chosen(tmp_path):
    """Before version 2 every setting was saved, the defaults of then included: drafter none
    (before speculation was on by default) and int8 threshold 6 now mean "never chosen", so
    such a user gets today's defaults there and keeps what they did change."""
    old = dataclasses.asdict(Settings(temperature=0.7, beam_length=6))
    old.update(drafter="none", int8_threshold=6.0, beam_width=4)
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(old))
    assert settings_file.load(path) == (Settings(temperature=0.7, beam_length=6), None)
    # the same values saved by this version were chosen
    settings_file.save(Settings(drafter="none", int8_threshold="6"), path)
    assert settings_file.load(path)[0].drafter == "none"
