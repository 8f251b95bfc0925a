"""Random-weight models of real shapes, to measure speed and memory against llama.cpp where the
real weights cannot be downloaded (random weights say nothing of quality, all of speed).

For each shape a folder OUT/NAME (OUT default /work/shapes) with
  hf/                 config.json, model.safetensors (bf16), the default model's tokenizer files
  model-F16.gguf      the same weights in llama.cpp's layout (Q/K rows permuted for llama)
  model-Q4_K_M.gguf, model-Q8_0.gguf   quantized from the F16 file by llama.cpp's own quantizer
The transformers files sit in hf/, not beside the GGUFs: transformers reads a GGUF's tokenizer
with the tokenizer_config.json of the GGUF's folder when there is one, which would give the
GGUFs a 49152-token tokenizer without a chat template.

The tokenizer is SmolLM2's (the default model's, 49152 tokens): its ids fit every vocabulary here,
so the safetensors folder ships it as it is; a GGUF must list exactly vocab_size tokens, so it
gets SmolLM2's tokens padded with [PAD<i>] entries (as llama.cpp's converter pads Qwen's). Prompts
therefore tokenize as SmolLM2 would (ChatML template), not as Llama 3 or Qwen would.

Every tensor is generated, written and converted one at a time (the 3B model is 6.4 GB in bf16).
Run by hand, not by the tests:
  .venv/bin/python packaging/real_shapes.py                      # all three, all files
  .venv/bin/python packaging/real_shapes.py llama-3.2-1b --quant Q4_K_M
The quantizer is llama-cpp-python's, from a packaging/install_llama_cpp.sh build folder
(--llama-cpp-dir, default the first of .bench/llama-cpp-{avx2,avx512,native} in this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# The shape-setting fields of each model's config.json on the Hub (bos/eos ids are set to the
# tokenizer's shipped here, since the model's own tokenizer is not).
SHAPES = {
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "llama-3.2-3b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "qwen2.5-1.5b": (
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            max_window_layers=21,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}
ARCHITECTURES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM"}
STD = 0.02  # initializer_range of both families; trained weights are of that order too
CHUNK = 1 << 24  # elements generated and converted at a time


def default_tokenizer():
    """(transformers tokenizer, GGUF reader) of xqchat's default model."""
    import gguf

    from xqchat.models import resolve
    from xqchat.models.tokenizer import load_tokenizer

    files = resolve("default")
    return load_tokenizer(files).hf, gguf.GGUFReader(files.path)


def write_config(folder: Path, kind: str, fields: dict, hf_tokenizer) -> dict:
    import transformers

    config = getattr(transformers, kind)(
        **fields,
        architectures=[ARCHITECTURES[kind]],
        dtype="bfloat16",
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
    )
    config.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama/Qwen2 checkpoint, in transformers' names."""
    d, h, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (heads * hd, d)),
            (p + "self_attn.k_proj.weight", (kv_heads * hd, d)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, d)),
        ]
        if bias:
            out += [
                (p + "self_attn.q_proj.bias", (heads * hd,)),
                (p + "self_attn.k_proj.bias", (kv_heads * hd,)),
                (p + "self_attn.v_proj.bias", (kv_heads * hd,)),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (d, heads * hd)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (h, d)),
            (p + "mlp.up_proj.weight", (h, d)),
            (p + "mlp.down_proj.weight", (d, h)),
        ]
    out.append(("model.norm.weight", (d,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, d)))
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even."""
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors, seed: int) -> None:
    """Random bf16 weights, N(0, STD) for matrices and biases, ones for norms, written tensor by
    tensor (a chunk of at most CHUNK elements in memory at a time)."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            size = int(np.prod(shape))
            if name.endswith("norm.weight"):
                to_bf16(np.ones(size, np.float32)).tofile(f)
                continue
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            for start in range(0, size, CHUNK):
                x = rng.standard_normal(min(CHUNK, size - start), dtype=np.float32)
                x *= STD
                to_bf16(x).tofile(f)
    partial.rename(path)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (the inverse of models/weights.py `_unpermute`)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_factors(cfg: dict) -> np.ndarray | None:
    """llama.cpp's rope_freqs tensor for llama3 RoPE scaling (as convert_hf_to_gguf.py makes it):
    the divisor of each inverse frequency."""
    from xqchat.models.spec import ModelSpec, RopeSpec

    spec = ModelSpec.from_hf_config(cfg)
    if spec.rope.type != "llama3":
        return None
    plain = RopeSpec(theta=spec.rope.theta).inv_freq(spec.head_dim)
    return (plain / spec.rope.inv_freq(spec.head_dim)).astype(np.float32)


def write_tokenizer_kv(writer, reader, vocab_size: int) -> None:
    """The default model's GGUF tokenizer, its token list padded to `vocab_size`."""
    import gguf

    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    if len(tokens) > vocab_size:
        raise SystemExit(f"the default tokenizer has {len(tokens)} tokens, more than {vocab_size}")
    pad = vocab_size - len(tokens)
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"].contents())
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * pad)
    writer.add_token_merges(fields["tokenizer.ggml.merges"].contents())
    for key, add in [
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unknown_token_id", writer.add_unk_token_id),
        ("padding_token_id", writer.add_pad_token_id),
    ]:
        if "tokenizer.ggml." + key in fields:
            add(fields["tokenizer.ggml." + key].contents())
    writer.add_add_bos_token(bool(fields["tokenizer.ggml.add_bos_token"].contents()))
    writer.add_add_space_prefix(bool(fields["tokenizer.ggml.add_space_prefix"].contents()))
    writer.add_chat_template(fields["tokenizer.chat_template"].contents())


def write_gguf_f16(path: Path, name: str, cfg: dict, safetensors: Path, reader) -> None:
    """The safetensors weights as llama.cpp's converter would write them at --outtype f16:
    matrices F16, norms and biases F32, Q/K rows permuted for llama, rope_freqs for llama3."""
    import gguf

    arch = cfg["model_type"]
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads, hd = cfg["num_key_value_heads"], cfg.get("head_dim") or d // heads
    w = gguf.GGUFWriter(path.with_suffix(".partial"), arch)
    w.add_name(name)
    w.add_type("model")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    write_tokenizer_kv(w, reader, cfg["vocab_size"])

    header_len = struct.unpack("<Q", safetensors.open("rb").read(8))[0]
    header = json.loads(safetensors.open("rb").read(8 + header_len)[8:])
    header.pop("__metadata__")
    data = np.memmap(safetensors, dtype=np.uint8, mode="r", offset=8 + header_len)
    plan = []  # (gguf name, hf name or None, numpy dtype)
    factors = rope_factors(cfg)
    if factors is not None:
        w.add_tensor_info("rope_freqs.weight", factors.shape, np.float32, factors.nbytes)
        plan.append(("rope_freqs.weight", None, np.float32))
    for hf, info in header.items():
        dtype = np.float16 if len(info["shape"]) == 2 else np.float32
        n = int(np.prod(info["shape"])) * np.dtype(dtype).itemsize
        w.add_tensor_info(gguf_name(hf), info["shape"], dtype, n)
        plan.append((gguf_name(hf), hf, dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, hf, dtype in plan:
        if hf is None:
            w.write_tensor_data(factors)
            continue
        info = header[hf]
        start, end = info["data_offsets"]
        array = from_bf16(data[start:end].view(np.uint16)).reshape(info["shape"]).astype(dtype)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            array = permute(array, heads if "attn_q" in gname else kv_heads)
        w.write_tensor_data(array)
        del array
    w.close()
    del data
    path.with_suffix(".partial").rename(path)


QUANTIZE = """
import ctypes, sys, llama_cpp
src, dst, kind, threads = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind)
p.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))
"""


def quantize(src: Path, dst: Path, kind: str, llama_dir: Path, threads: int) -> None:
    """llama.cpp's quantizer (llama-cpp-python's binding) in a child process, so its library
    and its threads are not this script's."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(llama_dir), os.environ.get("PYTHONPATH", "")]),
    }
    partial = dst.with_suffix(".partial")
    args = [sys.executable, "-c", QUANTIZE, str(src), str(partial), kind, str(threads)]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"llama.cpp could not quantize {src} to {kind} (exit {done.returncode})")
    partial.rename(dst)


def find_llama_dir(given: Path | None) -> Path:
    """A build folder of packaging/install_llama_cpp.sh: quantizing runs no matmul, so any level
    writes the same files."""
    levels = ("avx2", "avx512", "native")
    candidates = [given] if given else [ROOT / ".bench" / f"llama-cpp-{level}" for level in levels]
    for c in candidates:
        if (c / "llama_cpp" / "__init__.py").is_file():
            return c
    raise SystemExit(
        f"no llama-cpp-python build in {', '.join(map(str, candidates))}: "
        "run packaging/install_llama_cpp.sh avx2, or give --llama-cpp-dir"
    )


def gib(path: Path) -> str:
    return f"{path.stat().st_size / 2**30:6.2f} GiB  {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"default all: {', '.join(SHAPES)}")
    ap.add_argument("--out", type=Path, default=Path("/work/shapes"))
    ap.add_argument(
        "--quant",
        nargs="*",
        default=["Q4_K_M", "Q8_0"],
        choices=["Q4_K_M", "Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q5_K_M"],
    )
    ap.add_argument(
        "--llama-cpp-dir", type=Path, default=None, help="a packaging/install_llama_cpp.sh folder"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="quantizer threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write files that exist again")
    args = ap.parse_args()
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        ap.error(f"unknown model {unknown[0]} (choose from {', '.join(SHAPES)})")
    llama_dir = find_llama_dir(args.llama_cpp_dir) if args.quant else None
    hf_tokenizer, reader = default_tokenizer()
    for name in args.models or list(SHAPES):
        kind, fields = SHAPES[name]
        folder = args.out / name
        (folder / "hf").mkdir(parents=True, exist_ok=True)
        cfg = write_config(folder / "hf", kind, fields, hf_tokenizer)
        hf_tokenizer.save_pretrained(folder / "hf")
        written = []
        st = folder / "hf" / "model.safetensors"
        if args.force or not st.is_file():
            t = time.perf_counter()
            write_safetensors(st, hf_tensors(cfg), args.seed)
            print(f"{name}: bf16 safetensors in {time.perf_counter() - t:.0f} s", flush=True)
        written.append(st)
        f16 = folder / "model-F16.gguf"
        if args.force or not f16.is_file():
            t = time.perf_counter()
            write_gguf_f16(f16, name, cfg, st, reader)
            print(f"{name}: F16 GGUF in {time.perf_counter() - t:.0f} s", flush=True)
        written.append(f16)
        for q in args.quant:
            out = folder / f"model-{q}.gguf"
            if args.force or not out.is_file():
                t = time.perf_counter()
                quantize(f16, out, q, llama_dir, args.threads)
                print(f"{name}: {q} in {time.perf_counter() - t:.0f} s", flush=True)
            written.append(out)
        for path in written:
            print(gib(path))


if __name__ == "__main__":
    main()
