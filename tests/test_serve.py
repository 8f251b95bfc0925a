"""`xqchat serve` through the official openai client, on the real default model (greedy): the
same text as `xqchat run`, usage, reuse across turns, stop strings, each error, a client that
leaves mid-stream, concurrent clients; and the serving parts alone (stop strings, the pool)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest
from conftest import cli

from xqchat.backends.base import CacheMemory, EngineOptions
from xqchat.backends.chat import common_prefix
from xqchat.backends.serving import SessionPool, StopStrings

KEY = "test-key"
QUESTION = "What is the capital of France?"


@dataclass
class Served:
    url: str
    server: object  # app.server.Server

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(default_files):
    """`xqchat serve` in this process on a free port, with an API key."""
    import uvicorn

    from xqchat.app.loading import open_model
    from xqchat.app.server import Server, create_app

    files, tokenizer, model = open_model(default_files, EngineOptions(backend="torch"))
    server = Server(files.name, model, tokenizer, cache_budget=2**30, api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.05)
    yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", server)
    assert server.active == 0
    runner.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def fresh(served, monkeypatch):
    """No reuse: each reply reads its whole prompt, as `xqchat run` does. A prompt read in other
    pieces (a reused prefix, then the rest) rounds differently, and greedy text may differ."""
    monkeypatch.setattr(served.server.completions.pool, "budget", 0)
    served.server.completions.pool.idle.clear()
    return served


def ask(client, messages, **options):
    return client.chat.completions.create(
        model="smollm2-135m", messages=messages, temperature=0, **options
    )


def streamed(client, messages, **options) -> tuple[str, list]:
    chunks = list(ask(client, messages, stream=True, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_stream_and_plain_replies_equal_xqchat_run(
    fresh, served, capsys, monkeypatch, default_tokenizer
):
    engine = served.server.model
    loaded = (None, served.server.completions.tokenizer, engine)  # run loads nothing again
    monkeypatch.setattr("xqchat.app.cli.load_engine", lambda files, opts: loaded)
    code, out, _ = cli(
        capsys, "run", "--backend", "torch", "--max-tokens", "24", "--json", QUESTION
    )
    assert code == 0
    run = json.loads(out)
    client = served.client()
    reply = ask(client, user(QUESTION), max_tokens=24)
    assert reply.choices[0].message.content == run["text"]
    assert reply.choices[0].finish_reason == run["finish_reason"] == "stop"
    prompt = len(default_tokenizer.render(user(QUESTION)))
    assert reply.usage.prompt_tokens == prompt
    assert reply.usage.completion_tokens == run["new_tokens"]
    assert reply.usage.total_tokens == prompt + run["new_tokens"]
    text, chunks = streamed(client, user(QUESTION), max_completion_tokens=24)
    assert text == run["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for
    code, out, _ = cli(
        capsys,
        "run",
        "--backend",
        "openai",
        "--url",
        served.url,
        "--api-key",
        KEY,
        "--max-tokens",
        "24",
        QUESTION,
    )
    assert (code, out) == (0, run["text"] + "\n")  # the same reply through the remote backend
    cut = ask(client, user(QUESTION), max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert [m.id for m in client.models.list()] == ["smollm2-135m"]


@pytest.mark.slow
def test_turn_two_reads_only_what_is_new(served, default_tokenizer):
    client = served.client()
    turn1 = user("Name a color.")
    first = ask(client, turn1, max_tokens=16)
    prompt1 = default_tokenizer.render(turn1)
    held = list(served.server.completions.pool.idle[-1].tokens)  # the session that answered
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content}]
    turn2 += user("Name another.")
    prompt2 = default_tokenizer.render(turn2)
    text, chunks = streamed(client, turn2, max_tokens=16, stream_options={"include_usage": True})
    used = chunks[-1].usage
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    shared = common_prefix(held, prompt2)
    assert shared > len(prompt1)  # the first reply is reused too, not only the first prompt
    assert used.prompt_tokens == len(prompt2)
    assert used.prompt_tokens_details.cached_tokens == shared
    with urllib.request.urlopen(served.url.removesuffix("/v1") + "/health") as answer:
        health = json.load(answer)  # no key needed: for load balancers and scripts
    pool = served.server.completions.pool
    assert health["cached_conversations"] == len(pool.idle) >= 1
    assert health["cache_bytes"] == pool.nbytes() > 0
    ended = chunks[-2].choices[0].finish_reason == "stop"  # then the end of turn counts too
    assert used.completion_tokens == len(default_tokenizer.encode(text)) + ended


@pytest.mark.slow
def test_stop_strings_end_the_reply_before_them(fresh, served):
    client = served.client()
    whole = ask(client, user(QUESTION), max_tokens=24).choices[0].message.content
    for stop in ([" Paris"], "l of Fr"):  # one token; the middle of several
        first = stop[0] if isinstance(stop, list) else stop
        reply = ask(client, user(QUESTION), max_tokens=24, stop=stop)
        assert reply.choices[0].message.content == whole[: whole.index(first)]
        assert reply.choices[0].finish_reason == "stop"
        text, chunks = streamed(client, user(QUESTION), max_tokens=24, stop=stop)
        assert text == whole[: whole.index(first)]


@pytest.mark.slow
def test_errors_take_openais_shape(served, monkeypatch):
    client = served.client()
    cases = [
        (openai.BadRequestError, {"temperature": 5}, 400, None, "temperature"),
        (openai.BadRequestError, {"stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
        (openai.BadRequestError, {"n": 2}, 400, None, "n"),
        (openai.BadRequestError, {"frequency_penalty": 0.5}, 400, None, "frequency_penalty"),
        (openai.NotFoundError, {"model": "gpt-4o"}, 404, "model_not_found", "model"),
    ]
    for error, options, status, code, param in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(
                **{"model": "smollm2-135m", "messages": user("hi"), **options}
            )
        body = caught.value.body
        assert caught.value.status_code == status
        assert (body["code"], body["param"], body["type"]) == (code, param, "invalid_request_error")
        assert param in body["message"]  # says which
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, user("word " * 10000), max_tokens=16)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "the prompt is 100" in caught.value.body["message"]  # says how long, never truncates
    with pytest.raises(openai.AuthenticationError) as caught:
        served.client("wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    monkeypatch.setattr(served.server, "limit", 0)  # a full queue
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, user("hi"), max_tokens=2)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "rate_limit_exceeded"


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_its_generation(served, monkeypatch):
    completions = served.server.completions
    run, finishes = completions.run, []

    def recorded(request, cancel):
        for piece in run(request, cancel):
            finishes.append(piece.finish_reason)
            yield piece

    monkeypatch.setattr(completions, "run", recorded)
    stream = ask(served.client(), user("Count from 1 to 500."), max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while served.server.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.server.active == 0
    assert finishes[-1] == "cancelled" and len(finishes) < 2000
    finishes.clear()  # now a client that leaves while a long prompt is read
    impatient = served.client().with_options(timeout=0.3)
    long = user("word " * 6000)
    with pytest.raises(openai.APITimeoutError):
        ask(impatient, long, max_tokens=4)
    while served.server.active and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    assert served.server.active == 0 and finishes == []  # not one token
    read = max(len(s.tokens) for s in served.server.completions.pool.idle)
    assert read < 6000  # the prefill stopped between chunks


@pytest.mark.slow
def test_concurrent_clients_get_the_texts_of_sequential_runs(fresh, served):
    prompts = [f"Say the number {n} in French." for n in range(4)]
    client = served.client()
    alone = {p: ask(client, user(p), max_tokens=8).choices[0].message.content for p in prompts}

    def chat(prompt: str) -> list[str]:
        own = served.client()  # each client its own connection
        return [streamed(own, user(prompt), max_tokens=8)[0] for _ in range(2)]

    clients = prompts * 2  # 8 clients, two on each prompt
    with ThreadPoolExecutor(len(clients)) as pool:
        together = list(pool.map(chat, clients))
    assert together == [[alone[p], alone[p]] for p in clients]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["run", "--backend", "openai", "hi"], 2, "--backend openai needs --url"),
        (["run", "--url", "http://127.0.0.1:9/v1", "hi"], 2, "--url applies with --backend openai"),
        (
            ["chat", "--backend", "openai", "--url", "http://h/v1", "--cache", "xquant"],
            2,
            "--cache: for a local model",
        ),
        (["serve", "--backend", "openai"], 2, "only chat and run talk to a server"),
        (
            ["run", "--backend", "openai", "--url", "ftp://h", "hi"],
            1,
            "--url ftp://h: give the server's address",
        ),
        (
            ["run", "--backend", "openai", "--url", "http://127.0.0.1:9", "hi"],
            1,
            "cannot reach http://127.0.0.1:9/v1: ",
        ),
    ],
)
def test_remote_options_are_checked_in_one_line(capsys, args, code, message):
    got, out, err = cli(capsys, *args)
    assert (got, out) == (code, "") and message in err and err.count("\n") == 1


def test_chat_through_a_server_opens_the_app_without_saving_the_key(capsys, monkeypatch):
    opened = []
    monkeypatch.setattr("xqchat.app.tui.app.run", lambda overrides=None: opened.append(overrides))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url = "http://127.0.0.1:9/v1"
    args = ["chat", "--backend", "openai", "--url", url, "--api-key", "k", "-m", "m"]
    assert cli(capsys, *args, "--temperature", "0.5")[0] == 0
    assert opened == [{"backend": "openai", "url": url, "model": "m", "temperature": 0.5}]
    assert os.environ["OPENAI_API_KEY"] == "k"  # for this run: Settings never hold it


def test_serve_warns_when_reachable_without_a_key(capsys, monkeypatch, default_tokenizer):
    class Files:
        name = "smollm2-135m"

    listened, capacity = [], []
    loaded = (Files(), default_tokenizer, None)

    def load_engine(files, opts):  # oneDNN reads its cache's size when it first builds
        capacity.append(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
        return loaded

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setattr("xqchat.app.serve_cli.load_engine", load_engine)
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: listened.append((host, port)))
    code, _, err = cli(capsys, "serve", "--host", "0.0.0.0", "--port", "8123")
    assert code == 0 and "WARNING: listening on 0.0.0.0 without --api-key" in err
    code, _, err = cli(capsys, "serve", "--host", "0.0.0.0", "--api-key", "k", "--port", "8124")
    assert code == 0 and "WARNING" not in err
    code, _, err = cli(capsys, "serve", "--port", "8125")
    assert code == 0 and "WARNING" not in err and "at http://127.0.0.1:8125/v1" in err
    assert listened == [("0.0.0.0", 8123), ("0.0.0.0", 8124), ("127.0.0.1", 8125)]
    assert capacity == ["16"] * 3  # set before the model loads (a server's RSS stays flat)


def test_stop_strings_hold_back_what_may_begin_one():
    stops = StopStrings(("o w", "xyz"))
    assert stops.add("Hel") == ("Hel", False)
    assert stops.add("lo") == ("l", False)  # "o" may begin "o w"
    assert stops.add(" ") == ("", False)
    assert stops.add("wor") == ("", True)
    tail = StopStrings(("xyz",))
    assert tail.add("ax") == ("a", False) and tail.flush() == "x"


class Sized:
    def __init__(self, tokens: list[int], nbytes: int):
        self.tokens, self.nbytes = tokens, nbytes

    def memory(self) -> CacheMemory:
        return CacheMemory(len(self.tokens), self.nbytes, 0, 0, 0, self.nbytes)


class Fresh:
    def new_session(self):
        return Sized([], 0)


def test_the_pool_reuses_the_longest_match_and_evicts_the_oldest():
    pool = SessionPool(Fresh(), budget=250)
    a, b, c = Sized([1, 2, 3, 4], 100), Sized([1, 2, 9, 9], 100), Sized([1, 7, 7, 7], 100)
    for session in (a, b, c):
        pool.put(session)
    assert pool.idle == [b, c] and pool.nbytes() == 200  # a was the oldest
    assert pool.take([1, 2, 9, 9, 5]) is b and pool.idle == [c]
    # sharing only a system prompt would cut a long conversation down to it: a new session
    assert pool.take([1, 8, 8]) not in (b, c) and pool.idle == [c]
    assert pool.take([1, 7, 7, 5]) is c  # keeps 3 of 4


SIZE = (110, 32)


def status_of(app) -> dict[str, str]:
    from xqchat.app.tui.widgets import StatusBar

    bar = app.chat_screen.query_one(StatusBar)
    return {s.id: str(s.render()) for s in bar.query("Static") if s.display}


@pytest.mark.slow
async def test_the_app_chats_through_a_server(fresh, served, dirs, monkeypatch):
    """`xqchat chat --backend openai --url URL` against `xqchat serve`: the server's greedy text,
    what the status bar can say about a server's model, local-only settings hidden, and a server
    that stops answering costs one line and no message."""
    from tui_fakes import send, settle

    from xqchat.app.tui.app import XQChatApp
    from xqchat.app.tui.settings_screen import SettingsScreen

    expected = ask(served.client(), user(QUESTION), max_tokens=24).choices[0].message.content
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    app = XQChatApp({"backend": "openai", "url": served.url, "max_tokens": 24})
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, QUESTION)
        chat = app.chat_screen.chat_id
        rows = [(m.role, m.content, m.status) for m in app.store.messages(chat)]
        assert rows == [("user", QUESTION, "done"), ("assistant", expected, "done")]
        shown = status_of(app)
        assert shown.keys() == {"model", "engine", "speed"}  # no weights, cache, gauge, memory
        assert shown["model"] == "smollm2-135m"
        assert shown["engine"] == "openai/" + served.url.split("/")[2]
        assert shown["speed"].endswith(" tok/s")
        await pilot.press("ctrl+s")
        await pilot.pause()
        form = app.screen
        assert isinstance(form, SettingsScreen)
        assert not form.query_one("#cache").parent.display and form.query_one("#url").parent.display
        await pilot.press("escape")
        model = app.engine.model
        model.client = model.client.with_options(base_url="http://127.0.0.1:9/v1")  # gone
        await send(pilot, "And of Italy?")
        problem = list(app._notifications)[-1].message
        assert problem.startswith(f"cannot reach {served.url}: ") and "\n" not in problem
        assert [(m.role, m.content) for m in app.store.messages(chat)] == [
            ("user", QUESTION),
            ("assistant", expected),
            ("user", "And of Italy?"),  # kept, to send again
            ("notice", f"no reply: {problem}"),
        ]


@pytest.fixture(scope="module")
def llama_server(default_files):
    """llama-cpp-python's OpenAI-compatible server on the default GGUF: a server nobody here
    wrote. Needs a build (packaging/install_llama_cpp.sh) and its server's dependencies
    (pip install sse-starlette starlette-context pydantic-settings); skipped without them."""
    import subprocess
    import sys

    from xqchat.app.llama_bench import default_level, find_build
    from xqchat.models.errors import XQError

    try:
        build = find_build(default_level())
    except XQError as e:
        pytest.skip(str(e))
    env = {**os.environ, "PYTHONPATH": str(build)}
    probe = [sys.executable, "-c", "import llama_cpp.server.app"]
    if subprocess.run(probe, env=env, capture_output=True).returncode:
        pytest.skip(
            "llama-cpp-python's server needs sse-starlette, starlette-context, pydantic-settings"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_files.path)]
    command += ["--model_alias", "smollm2-gguf", "--port", str(port), "--n_ctx", "2048"]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "llama server failed"
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
async def test_the_app_chats_through_llama_cpps_server(llama_server, dirs, capsys):
    from tui_fakes import send, settle

    from xqchat.app.tui.app import XQChatApp

    code, out, _ = cli(
        capsys, "run", "--backend", "openai", "--url", llama_server, "--max-tokens", "24", QUESTION
    )
    assert code == 0 and out.strip()  # its own sampling defaults: not our text
    app = XQChatApp({"backend": "openai", "url": llama_server, "max_tokens": 24})
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, QUESTION)
        (_, _, _), (role, answer, status) = [
            (m.role, m.content, m.status) for m in app.store.messages(app.chat_screen.chat_id)
        ]
        assert role == "assistant" and answer.strip() and status in ("done", "length")
        shown = status_of(app)
        assert (
            shown.keys() == {"model", "engine", "speed"}
            and shown["model"] == "smollm2-gguf"
            and shown["speed"].endswith(" tok/s")
        )
