"""SVG snapshots of the main screen, settings and help at a fixed terminal size, over the scripted
engine (fixed replies and stats; nothing on screen depends on the clock). Update them after an
intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`, and look at them."""

import pytest
from tui_fakes import app_with, send, settle

from xqchat.app.tui.widgets import PromptInput

pytestmark = pytest.mark.usefixtures("dirs")


@pytest.fixture(autouse=True)
def memory(monkeypatch):
    """The settings' memory plan says this machine's memory: the same on every machine here."""
    from xqchat.backends import planner

    monkeypatch.setattr(planner, "machine_memory", lambda: 16 * 2**30)


SIZE = (120, 34)
REPLY = """Use slicing or `reversed`:

```python
items = [1, 2, 3]
print(items[::-1])  # [3, 2, 1]
```

`list.reverse()` reverses **in place**."""


def conversation(tokenizer):
    app, _ = app_with(tokenizer, [REPLY])
    for title in ("Rivers of Europe", "A haiku about tea"):
        chat = app.store.new_chat(title)
        app.store.add(chat, "user", title)

    async def run_before(pilot):
        await settle(pilot)
        pilot.app.screen.query_one(PromptInput).cursor_blink = False
        await pilot.press("ctrl+n")
        await send(pilot, "How do I reverse a list in Python?")

    return app, run_before


def test_main_screen(snap_compare, default_tokenizer):
    app, run_before = conversation(default_tokenizer)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare, default_tokenizer):
    app, run_before = conversation(default_tokenizer)
    assert snap_compare(app, press=["ctrl+s"], terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, default_tokenizer):
    app, run_before = conversation(default_tokenizer)
    assert snap_compare(app, press=["f1"], terminal_size=SIZE, run_before=run_before)
