"""Make the README's screenshot: the app itself, on the default model, in a real conversation.

.venv/bin/python packaging/screenshot.py docs/screenshot.svg
"""

import asyncio
import sys
import tempfile
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
]


async def main(out: Path) -> None:
    from xqchat.app.tui.app import XQChatApp
    from xqchat.app.tui.widgets import PromptInput

    app = XQChatApp(
        {"max_tokens": 120, "cache": "kv-quant", "bits": 4, "group": 32, "residual": 32}
    )
    async with app.run_test(size=(120, 34)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        prompt = app.screen.query_one(PromptInput)
        prompt.cursor_blink = False
        for question in QUESTIONS:
            prompt.text = question
            await pilot.press("enter")
            await pilot.pause()
            await app.workers.wait_for_complete()
        await pilot.pause()
        app.save_screenshot(out.name, str(out.parent))


if __name__ == "__main__":
    import os

    home = tempfile.mkdtemp(prefix="xqchat-shot-")  # a fresh chat store and default settings
    os.environ["XDG_DATA_HOME"] = os.environ["XDG_CONFIG_HOME"] = home
    asyncio.run(main(Path(sys.argv[1]).resolve()))
