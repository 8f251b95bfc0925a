"""`xqchat serve` measured through the API (issue 26's goals); docs/benchmarks.md has the figures.

Reuse across requests (the default): a 10-turn conversation (MT-Bench's first questions as the
user's turns) replayed with the default --cache-budget, then the same messages with
--cache-budget 0 (no reuse); per run, the tokens prefilled over all turns and turn 10's time to
first token. --clients N: N clients at once, each sending --requests questions of its own, against
the same questions sent one after another; aggregate completion tok/s of each and the times to
first token (p50, p95). --soak N: N one-turn conversations in a row, each a new one, and the
server's resident memory after each (its peak against the first's, and the pool's bytes).

    .venv/bin/python packaging/bench_serve.py [--turns 10] [--max-tokens 128] [-- serve options]
    .venv/bin/python packaging/bench_serve.py --clients 8 --requests 4 --max-tokens 64
    .venv/bin/python packaging/bench_serve.py --soak 200 --max-tokens 16 -- --cache-budget 64MB
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def serve(options: list[str]) -> tuple[subprocess.Popen, openai.OpenAI]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    xqchat = Path(sys.executable).with_name("xqchat")
    process = subprocess.Popen([xqchat, "serve", "--port", str(port), *options])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    while True:
        try:
            client.models.list()
            return process, client
        except openai.APIConnectionError:
            assert process.poll() is None, "xqchat serve exited"
            time.sleep(0.5)


def turn(client, messages: list[dict], max_tokens: int) -> tuple[str, float, dict]:
    """(reply, seconds to its first token, usage)"""
    start = time.perf_counter()
    first, text, usage = None, "", None
    for chunk in client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    return text, first, usage.model_dump()


def replay(options: list[str], questions: list[str], max_tokens: int, replies=None) -> dict:
    """Each turn sends the whole conversation so far; `replies`: the assistant's turns to send
    (another run's), so both runs read the same conversation."""
    process, client = serve(options)
    try:
        messages, prefilled, said = [], 0, []
        for i, question in enumerate(questions):
            messages.append({"role": "user", "content": question})
            text, ttft, usage = turn(client, messages, max_tokens)
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            prefilled += usage["prompt_tokens"] - cached
            said.append(text if replies is None else replies[i])
            messages.append({"role": "assistant", "content": said[-1]})
        root = str(client.base_url).removesuffix("/").removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/health") as answer:
            health = json.load(answer)
        return {
            "conversation_bytes": health["cache_bytes"],
            "prefilled_tokens": prefilled,
            "last_prompt_tokens": usage["prompt_tokens"],
            "last_cached_tokens": cached,
            "last_ttft_s": round(ttft, 3),
            "replies": said,
        }
    finally:
        process.terminate()
        process.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def at_once(client, asked: list[str], width: int, max_tokens: int) -> dict:
    """`asked` sent by `width` clients at once (each its share, one request after another)."""
    ttfts, tokens, lock = [], [0], threading.Lock()

    def work(mine: list[str]) -> None:
        for question in mine:
            _, ttft, usage = turn(client, [{"role": "user", "content": question}], max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens[0] += usage["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(asked[i::width],)) for i in range(width)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {
        "requests": len(ttfts),
        "completion_tok_s": round(tokens[0] / seconds, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
    }


def clients(options: list[str], questions: list[str], n: int, requests: int, max_tokens: int):
    """One question per request, each client's own: sequentially, then n clients at once."""
    process, client = serve(options)
    try:
        asked = [questions[i % len(questions)] for i in range(n * requests)]
        runs = {name: at_once(client, asked, width, max_tokens)
                for name, width in (("sequential", 1), ("concurrent", n))}  # fmt: skip
        runs["aggregate_ratio"] = round(
            runs["concurrent"]["completion_tok_s"] / runs["sequential"]["completion_tok_s"], 3
        )
        return runs
    finally:
        process.terminate()
        process.wait()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def soak(options: list[str], questions: list[str], n: int, max_tokens: int) -> dict:
    """n new one-turn conversations (a question and a number, so no two share more than the
    question): the server's RSS after each, and what its pool holds at the end."""
    process, client = serve(options)
    try:
        after = []
        for i in range(n):
            user = [{"role": "user", "content": f"{questions[i % len(questions)]} ({i})"}]
            turn(client, user, max_tokens)
            after.append(rss(process.pid))
        root = str(client.base_url).removesuffix("/").removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/health") as answer:
            health = json.load(answer)
        return {
            "requests": n,
            "rss_after_first": after[0],
            "rss_peak": max(after),
            "rss_last": after[-1],
            "pool": {k: v for k, v in health.items() if k != "status"},
        }
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="one run, with reuse: how many bytes the conversation's cache holds (per --cache)",
    )
    parser.add_argument("--clients", type=int, help="this many clients at once")
    parser.add_argument("--requests", type=int, default=4, help="--clients: requests per client")
    parser.add_argument("--soak", type=int, help="this many new conversations in a row")
    parser.add_argument("serve_options", nargs="*")
    args = parser.parse_args()
    lines = PROMPTS.read_text().splitlines()
    questions = [json.loads(line)["turns"][0] for line in lines]
    if args.clients:
        runs = clients(args.serve_options, questions, args.clients, args.requests, args.max_tokens)
        print(json.dumps(runs, indent=2))
        return
    if args.soak:
        print(json.dumps(soak(args.serve_options, questions, args.soak, args.max_tokens), indent=2))
        return
    questions = questions[: args.turns]
    reuse = replay(args.serve_options, questions, args.max_tokens)
    if args.reuse_only:
        del reuse["replies"]
        print(json.dumps(reuse, indent=2))
        return
    none = replay(
        [*args.serve_options, "--cache-budget", "0"], questions, args.max_tokens, reuse["replies"]
    )
    result = {"reuse": reuse, "no_reuse": none}
    for run in result.values():
        del run["replies"]
    result["prefill_ratio"] = round(reuse["prefilled_tokens"] / none["prefilled_tokens"], 3)
    result["ttft_ratio"] = round(reuse["last_ttft_s"] / none["last_ttft_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
