"""Every CPU path of the default model side by side, in rounds that alternate the configurations:
`xqchat bench speed` per configuration, as on this CPU and (on an AVX-512 CPU) as on an AVX2-only
one (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2). The figures in docs/benchmarks.md
("The CPU path per CPU") come from it.

    .venv/bin/python packaging/bench_cpu_paths.py weights [--rounds 2] [--cpu native avx2]
    .venv/bin/python packaging/bench_cpu_paths.py caches --contexts 2048 4096 7800
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# name -> (environment, bench options); "before" is the engine as it was before the paths were
# measured: plain bf16 everywhere where oneDNN cannot pack, torch._int_mm for int8 products
WEIGHTS = {
    "auto": ({}, []),
    "fp32": ({}, ["--weights", "fp32"]),
    "fp16": ({}, ["--weights", "fp16"]),
    "bf16 oneDNN packed": ({"XQCHAT_BF16_PATH": "onednn-packed"}, ["--weights", "bf16"]),
    "bf16 C pass + fp32 copy": (
        {"XQCHAT_BF16_PATH": "c-pass", "XQCHAT_BF16_PROMPT": "float32 copy"},
        ["--weights", "bf16"],
    ),
    "bf16 torch (before)": (
        {"XQCHAT_BF16_PATH": "torch", "XQCHAT_BF16_PROMPT": "torch", "XQCHAT_INT_MM": "1"},
        ["--weights", "bf16"],
    ),
    "int8": ({}, ["--weights", "int8"]),
}
CACHES = {
    "kv": ["--cache", "kv"],
    "kv-quant 4": ["--cache", "kv-quant", "--bits", "4"],
    "xquant 4": ["--cache", "xquant", "--bits", "4"],
    "xquant-cl 3": ["--cache", "xquant-cl", "--bits", "3"],
}


def bench(env: dict, options: list[str]) -> dict:
    command = [str(ROOT / ".venv" / "bin" / "xqchat"), "bench", "speed", "--json"]
    command += ["--prompts", str(PROMPTS), *options]
    done = subprocess.run(
        command, capture_output=True, text=True, env=os.environ | env, timeout=3600
    )
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["weights", "caches"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu", nargs="+", default=["native", "avx2"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048])
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", nargs="+", help="configurations to run (names as listed)")
    args = parser.parse_args()
    base = ["--limit", str(args.limit), "--new-tokens", str(args.new_tokens)]
    configs = {}
    for cpu in args.cpu:
        cap = AVX2 if cpu == "avx2" else {}
        if args.what == "weights":
            for name, (env, options) in WEIGHTS.items():
                configs[(cpu, name, 0)] = (cap | env, base + options)
        else:
            for context in args.contexts:
                for name, options in CACHES.items():
                    configs[(cpu, name, context)] = (
                        cap,
                        base + options + ["--context", str(context)],
                    )
    if args.only:
        configs = {k: v for k, v in configs.items() if k[1] in args.only}
    results: dict = {key: [] for key in configs}
    for round_ in range(args.rounds):
        for key, (env, options) in configs.items():
            result = bench(env, options)
            results[key].append(result)
            print(f"round {round_ + 1} {key}: {summary(result)}", file=sys.stderr, flush=True)
    print(json.dumps({" | ".join(map(str, k)): v for k, v in results.items()}, indent=1))
    print("\n| CPU | configuration | context | decode tok/s | prefill tok/s | paths |")
    print("|---|---|---|---|---|---|")
    for (cpu, name, context), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"| {cpu} | {name} | {context} | {runs[0]['error']} | | |")
            continue
        decode = " / ".join(f"{r['decode_tok_s']:.1f}" for r in ok)
        prefill = " / ".join(f"{r['prefill_tok_s']:.0f}" for r in ok)
        paths = ok[0]["paths"]
        path = f"{ok[0]['weights']}: {paths.get('bf16_decode', '')}, {paths.get('bf16_prompt', '')}"
        path += f", int8 {paths.get('int8_many_rows', '')}"
        median = statistics.median(r["decode_tok_s"] for r in ok)
        print(
            f"| {cpu} | {name} | {context} | {decode} (median {median:.1f}) | {prefill} | {path} |"
        )


def summary(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return f"decode {result['decode_tok_s']:.1f} prefill {result['prefill_tok_s']:.0f}"


if __name__ == "__main__":
    main()
