"""The chat TUI driven headless (App.run_test) over a scripted engine: sending, streaming,
cancel, regenerate, edit, context policies, chats, export, copy, settings, help, first run."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tui_fakes import app_with, send, settle

from xqchat.app.tui.app import XQChatApp
from xqchat.app.tui.chat_screen import ChatScreen
from xqchat.app.tui.dialogs import ConfirmScreen, HelpScreen, TextPrompt
from xqchat.app.tui.replying import REGENERATE_HELP, REGENERATE_TEMPERATURE
from xqchat.app.tui.settings import Settings
from xqchat.app.tui.settings_screen import SettingsScreen
from xqchat.app.tui.store import Message, Store, to_markdown
from xqchat.app.tui.widgets import MessageView, NoticeView, PromptInput, StatusBar
from xqchat.backends.chat import common_prefix

SIZE = (110, 32)
CODE_REPLY = "Here:\n\n```python\nprint('hi')\n```\n\nand\n\n```sh\nls -la\n```\n"


pytestmark = pytest.mark.usefixtures("dirs")


@pytest.fixture
def documents(dirs, monkeypatch):
    """The export folder, under tmp_path: ~/Documents/xqchat with HOME there (no user-dirs.dirs in
    the test's XDG_CONFIG_HOME, so platformdirs takes ~/Documents)."""
    monkeypatch.setenv("HOME", str(dirs / "home"))
    return dirs / "home" / "Documents" / "xqchat"


def rows(app) -> list[tuple[str, str, str]]:
    screen = app.chat_screen
    return [(m.role, m.content, m.status) for m in app.store.messages(screen.chat_id)]


def last_note(app) -> str:
    return list(app._notifications)[-1].message


def status_text(app) -> dict[str, str]:
    bar = app.chat_screen.query_one(StatusBar)
    return {s.id: str(s.render()) for s in bar.query("Static")}


async def test_send_streams_a_reply_and_shows_memory_and_speed(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Hello **there**!"])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Hi, who are you?")
        assert rows(app) == [
            ("user", "Hi, who are you?", "done"),
            ("assistant", "Hello **there**!", "done"),
        ]
        views = app.chat_screen.query(MessageView)
        assert [(v.role, v.text) for v in views] == [
            ("user", "Hi, who are you?"),
            ("assistant", "Hello **there**!"),
        ]
        assert app.store.chats()[0].title == "Hi, who are you?"
        held = len(model.prompts[0]) + len(default_tokenizer.encode("Hello **there**!"))
        status = status_text(app)
        assert status["model"] == "fake-model"
        assert status["engine"] == "fake/cpu"
        assert status["cache"] == "kv"
        assert status["gauge"] == f"ctx {held}/4,096"
        assert status["memory"] == f"cache {held} KiB (4.0× smaller than fp16 KV)"
        assert status["speed"] == "42.0 tok/s"


async def test_gauge_warns_near_the_limit(default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        bar = app.chat_screen.query_one(StatusBar)
        gauge = bar.query_one("#gauge")
        for used, classes in [(50, set()), (80, {"-warning"}), (96, {"-full"})]:
            bar.show_context(used, 100)
            assert {"-warning", "-full"} & set(gauge.classes) == classes


async def test_the_status_bar_says_how_much_of_what_memory_holds_the_chat_uses(default_tokenizer):
    """Shown only where the machine's memory, not the context, is what ends a chat."""
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        bar = app.chat_screen.query_one(StatusBar)
        info = dataclasses.replace(app.engine.info, max_context=4096, fits=1000)
        bar.show_fit(250, info)
        assert status_text(app)["fit"] == "RAM holds 1,000 tok: 25% used"
        assert "-warning" not in bar.query_one("#fit").classes
        bar.show_fit(850, info)
        assert "-warning" in bar.query_one("#fit").classes
        for fits in (4096, None):  # the context binds first, or the weights are not planned
            bar.show_fit(250, dataclasses.replace(info, fits=fits))
            assert not bar.query_one("#fit").display


async def send_until_held(pilot, app, model, text):
    """Send `text` and wait until the fake model holds its reply mid-way."""
    await settle(pilot)
    app.screen.query_one(PromptInput).text = text
    await pilot.press("enter")
    while not model.held.is_set():
        await pilot.pause(0.05)


async def test_escape_cancels_and_keeps_the_partial_reply_marked(default_tokenizer):
    reply = "One two three four five six seven eight."
    app, model = app_with(default_tokenizer, [reply], hold_after=3)
    async with app.run_test(size=SIZE) as pilot:
        await send_until_held(pilot, app, model, "Count.")
        await pilot.press("escape")
        await settle(pilot)
        partial = default_tokenizer.decode(default_tokenizer.encode(reply)[:4])
        assert reply.startswith(partial) and partial != reply
        assert rows(app)[-1] == ("assistant", partial, "cancelled")
        view = app.chat_screen.query(MessageView).last()
        assert view.title == "Assistant · cancelled: partial reply"
        assert view.has_class("-partial")


async def test_quitting_mid_reply_keeps_the_partial_reply(default_tokenizer):
    reply = "One two three four five six seven eight."
    app, model = app_with(default_tokenizer, [reply], hold_after=3)
    async with app.run_test(size=SIZE) as pilot:
        await send_until_held(pilot, app, model, "Count.")
        chat_id = app.chat_screen.chat_id
        await pilot.press("ctrl+q")
    store = Store()
    partial = default_tokenizer.decode(default_tokenizer.encode(reply)[:3])
    assert [(m.role, m.content, m.status) for m in store.messages(chat_id)] == [
        ("user", "Count.", "done"),
        ("assistant", partial, "interrupted"),
    ]


async def test_the_ui_stays_usable_while_a_reply_streams(default_tokenizer):
    app, model = app_with(default_tokenizer, ["A long answer that is held."], hold_after=2)
    first = app.store.new_chat("First chat")  # a finished chat to switch to
    app.store.add(first, "user", "First chat")
    app.store.add(first, "assistant", "Done.")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+n")
        app.screen.query_one(PromptInput).text = "Second chat"
        await pilot.press("enter")
        while not model.held.is_set():
            await pilot.pause(0.05)
        app.chat_screen.open_chat(first)  # switching chats mid-reply
        await pilot.pause()
        await pilot.press(*"typing")
        assert app.screen.query_one(PromptInput).text == "typing"
        assert [v.role for v in app.chat_screen.query(MessageView)] == ["user", "assistant"]
        await pilot.press("escape")  # cancels the reply of the other chat
        await settle(pilot)
        second = app.store.chats()[0].id
        assert app.store.messages(second)[-1].status == "cancelled"


async def test_regenerate_replaces_the_reply_reusing_the_cache(default_tokenizer):
    app, model = app_with(default_tokenizer, ["First answer.", "Second answer."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Say something.")
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert rows(app) == [
            ("user", "Say something.", "done"),
            ("assistant", "Second answer.", "done"),
        ]
        assert [v.text for v in app.chat_screen.query(MessageView)] == [
            "Say something.",
            "Second answer.",
        ]
        assert model.prompts[1] == model.prompts[0]
        assert model.prefills == [len(model.prompts[0]), 1]  # the prompt's last token only


@pytest.mark.parametrize("temperature, sampled", [(0.0, REGENERATE_TEMPERATURE), (0.3, 0.3)])
async def test_regenerate_samples_with_a_new_seed_each_time(
    default_tokenizer, temperature, sampled
):
    app, model = app_with(
        default_tokenizer, ["One.", "Two.", "Three."], {"temperature": temperature}
    )
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Say something.")
        await pilot.press("ctrl+r")
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)
        first, *again = model.configs
        assert (first.temperature, first.seed) == (temperature, None)  # a send: as set
        assert [cfg.temperature for cfg in again] == [sampled, sampled]
        seeds = [cfg.seed for cfg in again]
        assert None not in seeds and seeds[0] != seeds[1]
        assert all(cfg.top_p == 1.0 and cfg.max_tokens == 512 for cfg in again)
        said = [n.message for n in app._notifications if n.message.startswith("Regenerating")]
        assert said == [f"Regenerating at temperature {sampled:g} (seed {s})." for s in seeds]
        assert rows(app) == [("user", "Say something.", "done"), ("assistant", "Three.", "done")]
        await send(pilot, "And now?")  # sending again is back to the settings' sampling
        assert (model.configs[-1].temperature, model.configs[-1].seed) == (temperature, None)


async def test_edit_the_last_message_and_resend(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Four.", "Six."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "What is 2+2?")
        await pilot.press("ctrl+e")
        prompt = app.screen.query_one(PromptInput)
        assert prompt.text == "What is 2+2?"
        assert app.chat_screen.query_one("#edit-hint").display
        prompt.text = "What is 3+3?"
        await pilot.press("enter")
        await settle(pilot)
        assert rows(app) == [("user", "What is 3+3?", "done"), ("assistant", "Six.", "done")]
        held = model.prompts[0] + default_tokenizer.encode("Four.")
        new = default_tokenizer.render([{"role": "user", "content": "What is 3+3?"}])
        assert model.prompts[1] == new
        assert model.prefills[1] == len(new) - common_prefix(held, new) < len(new) // 3
        assert not app.chat_screen.query_one("#edit-hint").display


async def test_stop_policy_refuses_and_keeps_the_message(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Short."], {"max_tokens": 8}, max_context=120)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for i in range(6):
            await send(pilot, f"Question {i}: " + "rivers and mountains " * 5)
            if rows(app)[-1][0] == "notice":
                break
        role, text, _ = rows(app)[-1]
        assert role == "notice" and text.startswith("no reply: the context is full")
        assert rows(app)[-2][0] == "user"  # the refused message is kept
        assert str(app.chat_screen.query(NoticeView).last().render()) == text
        assert all(len(p) <= 120 - 8 for p in model.prompts)


@pytest.mark.parametrize(
    "policy, said",
    [("drop-oldest", "left out the 1 oldest turn(s)"), ("sink-window", "attention sinks")],
)
async def test_overflow_policies_say_what_they_dropped(default_tokenizer, policy, said):
    overrides = {"max_tokens": 8, "overflow": policy, "window": 40}
    app, model = app_with(default_tokenizer, ["Short."], overrides, max_context=120)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for i in range(6):
            await send(pilot, f"Question {i}: " + "rivers and mountains " * 5)
        notices = [text for role, text, _ in rows(app) if role == "notice"]
        assert notices and said in notices[0]
        assert [str(v.render()) for v in app.chat_screen.query(NoticeView)] == notices
        assert [r[0] for r in rows(app)].count("assistant") == 6  # every turn was answered
        assert all(len(p) <= 120 - 8 for p in model.prompts)


async def test_new_chat_rename_search_and_delete_with_confirmation(default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "About rivers")
        await pilot.press("ctrl+n")
        assert app.chat_screen.chat_id is None and not app.chat_screen.query(MessageView)
        await send(pilot, "About cakes")
        assert [c.title for c in app.store.chats()] == ["About cakes", "About rivers"]

        await pilot.press("f2")
        assert isinstance(app.screen, TextPrompt)
        app.screen.query_one("Input").value = "Cheesecake"
        await pilot.press("enter")
        assert [c.title for c in app.store.chats()] == ["Cheesecake", "About rivers"]
        listing = app.chat_screen.query_one("#chats")
        assert [str(o.prompt) for o in listing.options] == ["Cheesecake", "About rivers"]

        await pilot.press("ctrl+f", *"river")
        assert [str(o.prompt) for o in listing.options] == ["About rivers"]
        app.chat_screen.query_one("#search").value = ""
        await pilot.pause()

        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert len(app.store.chats()) == 2
        await pilot.press("f8", "y")
        await pilot.pause()
        assert [c.title for c in app.store.chats()] == ["About rivers"]
        assert app.chat_screen.chat_id == app.store.chats()[0].id  # the next chat opens
        assert [v.text for v in app.chat_screen.query(MessageView)][0] == "About rivers"


async def test_system_prompt_reaches_the_model(default_tokenizer):
    app, model = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f3")
        app.screen.query_one("Input").value = "Answer in French."
        await pilot.press("enter")
        await send(pilot, "Hello")
        expected = [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
        ]
        assert model.prompts[0] == default_tokenizer.render(expected)
        assert app.store.chat(app.chat_screen.chat_id).system == "Answer in French."


async def test_export_writes_into_the_exports_folder_and_says_where(default_tokenizer, documents):
    app, _ = app_with(default_tokenizer, ["The Danube."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Name a river")
        chat_id = app.chat_screen.chat_id
        expected = to_markdown(app.store.chat(chat_id), app.store.messages(chat_id))
        await pilot.press("f5")
        assert str(app.screen.query_one(".title").render()) == (
            f"Export this chat to Markdown (in {documents})"
        )
        assert app.screen.query_one("Input").value == "name-a-river.md"
        await pilot.press("enter")
        assert (documents / "name-a-river.md").read_text() == expected
        assert last_note(app) == f"Exported to {documents / 'name-a-river.md'}"

        await pilot.press("f5")  # the next export offers a free name
        assert app.screen.query_one("Input").value == "name-a-river-2.md"
        app.screen.query_one("Input").value = "name-a-river.md"  # a taken name: asks first
        await pilot.press("enter")
        assert isinstance(app.screen, ConfirmScreen)
        (documents / "name-a-river.md").write_text("mine")
        await pilot.press("n")
        assert (documents / "name-a-river.md").read_text() == "mine"
        await pilot.press("f5")
        app.screen.query_one("Input").value = "name-a-river.md"
        await pilot.press("enter", "y")
        assert (documents / "name-a-river.md").read_text() == expected
    assert "## You\n\nName a river\n" in expected and "## Assistant\n\nThe Danube.\n" in expected


async def test_export_to_a_path_of_ones_choosing(default_tokenizer, documents, dirs):
    app, _ = app_with(default_tokenizer, ["The Danube."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Name a river")
        for given, written in [
            (str(dirs / "out" / "river.md"), dirs / "out" / "river.md"),  # absolute: as given
            ("~/notes/river.md", dirs / "home" / "notes" / "river.md"),
            ("rivers/danube.md", documents / "rivers" / "danube.md"),  # relative: in the folder
        ]:
            await pilot.press("f5")
            app.screen.query_one("Input").value = given
            await pilot.press("enter")
            assert written.read_text().startswith("# Name a river\n")
            assert last_note(app) == f"Exported to {written}"
        (dirs / "blocked").write_text("a file, not a folder")
        await pilot.press("f5")
        app.screen.query_one("Input").value = str(dirs / "blocked" / "x.md")
        await pilot.press("enter")
        assert last_note(app).startswith(f"Cannot write {dirs / 'blocked'}/x.md")


async def test_copy_a_message_and_a_code_block(default_tokenizer):
    app, _ = app_with(default_tokenizer, [CODE_REPLY])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Show code")
        await pilot.press("ctrl+o")
        assert app.clipboard == CODE_REPLY
        await pilot.press("ctrl+b")  # two blocks: pick the second
        await pilot.press("down", "enter")
        assert app.clipboard == "ls -la"
        app.chat_screen.query(MessageView).first().focus()
        await pilot.press("ctrl+o")
        assert app.clipboard == "Show code"


async def test_help_lists_every_binding_and_the_palette_every_action(default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one("DataTable")
        listed = {table.get_row_at(i)[1] for i in range(table.row_count)}
        actions = {b.description for b in (*ChatScreen.BINDINGS, *XQChatApp.BINDINGS)}
        assert actions | {"Send", "New line", "Commands"} == listed
        said = {table.get_row_at(i)[1]: table.get_row_at(i)[2] for i in range(table.row_count)}
        assert said["Regenerate"] == REGENERATE_HELP
        assert f"temperature {REGENERATE_TEMPERATURE} if yours is 0" in REGENERATE_HELP
        assert "~/Documents/xqchat" in said["Export"]
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(app.chat_screen)}
        assert actions <= titles


async def test_settings_are_saved_and_read_back(default_tokenizer, dirs):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature").value = "0.7"
        app.screen.query_one("#overflow").value = "drop-oldest"
        app.screen.query_one("#cache").value = "kv-quant"
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert app.settings == Settings(temperature=0.7, overflow="drop-oldest", cache="kv-quant")
        assert app.chat_screen.query_one("#cache").render() == "kv-quant 4-bit"
    saved = json.loads((dirs / "config" / "xqchat" / "settings.json").read_text())
    assert saved == {
        "version": 2,
        "temperature": 0.7,
        "overflow": "drop-oldest",
        "cache": "kv-quant",
    }
    again, _ = app_with(default_tokenizer)
    assert again.settings == Settings(temperature=0.7, overflow="drop-oldest", cache="kv-quant")


async def test_settings_screen_refuses_a_bad_value(default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+s")
        app.screen.query_one("#top_p").value = "1.5"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        assert any("top_p" in n.message for n in app._notifications)
        await pilot.press("escape")
        assert app.settings == Settings()


@pytest.mark.parametrize("content", ["{not json", '{"temperature": "hot"}', '{"colour": 1}', "[]"])
async def test_a_broken_settings_file_is_reported_and_replaced(default_tokenizer, dirs, content):
    path = dirs / "config" / "xqchat" / "settings.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.settings == Settings()
        assert any("was broken" in n.message for n in app._notifications)
    assert json.loads(path.read_text()) == {"version": 2}  # nothing chosen: the defaults
    assert (path.parent / "settings.json.broken").read_text() == content


async def test_reopening_restores_a_chat(default_tokenizer):
    app, _ = app_with(default_tokenizer, ["Paris."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Capital of France?")
    again, _ = app_with(default_tokenizer)
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert [(v.role, v.text) for v in again.chat_screen.query(MessageView)] == [
            ("user", "Capital of France?"),
            ("assistant", "Paris."),
        ]
        chat_id = again.chat_screen.chat_id
        assert again.store.messages(chat_id)[1] == Message(2, "assistant", "Paris.", "done")


@pytest.mark.slow
async def test_a_real_exchange_with_the_default_model():
    app = XQChatApp({"max_tokens": 16, "backend": "torch"})
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "What is the capital of France?")
        (_, question, _), (role, answer, status) = rows(app)
        assert question == "What is the capital of France?"
        assert role == "assistant" and "Paris" in answer and status in ("done", "length")
        text = status_text(app)
        assert text["model"] == "smollm2-135m" and text["engine"].startswith("torch/cpu")
        assert text["weights"] == app.engine.model.dtype != ""
        # speculation is on by default: tokens per step and whether it pays follow the speed
        speed = text["speed"].split(" · ")
        assert speed[0].endswith("tok/s") and speed[1].endswith("tok/step")
        assert speed[2].startswith("speculation ")  # on or off, and by how much
        assert text["memory"].startswith("cache ")


@pytest.mark.slow
async def test_a_real_exchange_with_the_shipped_drafter_shows_tokens_per_step():
    # the whole tree at every step: the adaptive policy may rightly verify none in a short reply
    app = XQChatApp({"max_tokens": 24, "backend": "torch", "drafter": "auto", "tree": "fixed"})
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "What is the capital of France?")
        (_, _, _), (role, answer, status) = rows(app)
        assert role == "assistant" and "Paris" in answer and status in ("done", "length")
        assert status_text(app)["drafter"] == "drafter: auto"
        speed = status_text(app)["speed"]
        assert speed.split(" · ")[1].endswith("tok/step")
        assert float(speed.split(" · ")[1].split()[0]) > 1  # drafts were accepted
