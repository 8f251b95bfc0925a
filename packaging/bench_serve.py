"""Reuse across requests, measured through the API (issue 26's goal 1): a 10-turn conversation
(MT-Bench's first questions as the user's turns) replayed through `xqchat serve` with the default
--cache-budget, then the same messages with --cache-budget 0 (no reuse). Prints, per run, the
tokens prefilled over all turns and turn 10's time to first token. docs/benchmarks.md has the
figures.

    .venv/bin/python packaging/bench_serve.py [--turns 10] [--max-tokens 128] [-- serve options]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="one run, with reuse: how many bytes the conversation's cache holds (per --cache)",
    )
    parser.add_argument("serve_options", nargs="*")
    args = parser.parse_args()
    lines = PROMPTS.read_text().splitlines()[: args.turns]
    questions = [json.loads(line)["turns"][0] for line in lines]
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
