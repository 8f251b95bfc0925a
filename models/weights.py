"""Weight readers. Both yield (HF tensor name, numpy float array) lazily, so a backend converts one
tensor at a time to its working dtype; names follow transformers' Llama layout."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import qweights
from .conventions import canonical, canonical_shapes
from .errors import XQError
from .gguf_header import read_header
from .qweights import Packed
from .registry import ModelFiles
from .spec import ModelSpec

_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "U32": np.uint32,  # MLX's packed codes
}


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsCheckpoint:
    """A model directory: config.json and one or more memory-mapped *.safetensors files."""

    def __init__(self, folder: Path):
        try:
            self.config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise XQError(f"cannot read {folder / 'config.json'}: {e}") from None
        self.spec = ModelSpec.from_hf_config(self.config)
        self._files = [self._index(p) for p in shard_paths(folder)]
        # an MLX-quantized checkpoint (mlx-community's): packed uint32 codes with `scales` and
        # `biases` beside each quantized matrix, the format in config.json
        quantization = self.config.get("quantization") or {}
        self.bits, self.group = quantization.get("bits"), quantization.get("group_size")
        self.quantized = self.bits is not None

    @staticmethod
    def _index(path: Path):
        size = path.stat().st_size
        bad = XQError(f"{path.name} is truncated or not a safetensors file; download it again")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise bad
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise bad from None
        header.pop("__metadata__", None)
        data_bytes = size - 8 - n
        for name, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise XQError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            if info["data_offsets"][1] > data_bytes:
                raise bad
        return path, 8 + n, header

    def _headers(self) -> Iterator[tuple[str, dict]]:
        """(name, header entry) of every tensor but the scales and biases of quantized ones."""
        for _, _, header in self._files:
            for name, info in header.items():
                if not name.endswith((".scales", ".biases")):
                    yield name, info

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers alone (a quantized matrix's as it stands for)."""
        shapes = {}
        for name, info in self._headers():
            shape = tuple(info["shape"])
            if info["dtype"] == "U32":
                shape = (*shape[:-1], shape[-1] * 32 // self.bits)
            shapes[name] = shape
        return canonical_shapes(self.spec, shapes)

    def dtypes(self) -> dict[str, str]:
        """Every tensor's stored type ("BF16", "F16", "F32", or "Q4" for MLX's 4-bit), from the
        headers alone."""
        return {
            name: f"Q{self.bits}" if info["dtype"] == "U32" else info["dtype"]
            for name, info in self._headers()
        }

    def _arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        for path, offset, header in self._files:
            if not header:
                continue
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
            for name, info in header.items():
                start, end = info["data_offsets"]
                array = (
                    data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
                )
                yield name, _bf16_to_f32(array) if info["dtype"] == "BF16" else array

    def tensors(self, packed: bool = False) -> Iterator[tuple[str, np.ndarray | Packed]]:
        """(HF name, array), memory-mapped where stored as they are, in the one convention of
        conventions.py. An MLX-quantized matrix comes as a qweights.Packed with `packed`
        (qweights.from_mlx), else dequantized."""
        return canonical(self.spec, self._stored(packed), norms_from_one=True)

    def _stored(self, packed: bool) -> Iterator[tuple[str, np.ndarray | Packed]]:
        if not self.quantized:
            yield from self._arrays()
            return
        parts: dict[str, dict] = {}  # a quantized matrix's codes, scales, biases until all came
        for name, array in self._arrays():
            stem, _, part = name.rpartition(".")
            if part not in ("scales", "biases") and array.dtype != np.uint32:
                yield name, array
                continue
            held = parts.setdefault(stem, {})
            held[part] = array
            if len(held) == 3:
                del parts[stem]
                yield (
                    stem + ".weight",
                    qweights.from_mlx(
                        held["weight"], held["scales"], held["biases"], self.bits, packed
                    ),
                )
        if parts:
            raise XQError(f"the quantized tensor {next(iter(parts))} lacks its scales or biases")


def shard_paths(folder: Path) -> list[Path]:
    """The weight files of a model folder: the shards its index names, else every *.safetensors."""
    # A sharded checkpoint's index names its shards; some repos also ship the same weights in
    # another layout (Mistral's consolidated.safetensors), which must not be read as well.
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    shards = index_shards(index)
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise XQError(f"{folder.name} lacks the shard {missing[0]} named in {index.name}")
    return [folder / name for name in shards]


def index_shards(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json names (each beside the index)."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise XQError(f"cannot read {index}: {e}") from None
    for name in shards:
        if (
            not isinstance(name, str)
            or Path(name).name != name
            or not name.endswith(".safetensors")
        ):
            raise XQError(f"{index} names a shard outside its folder: {name}")
    return shards


_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Phi-3: fused, split by conventions.canonical
    "attn_qkv": "self_attn.qkv_proj",
    # Gemma 3's extra norms
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# where an architecture names a tensor otherwise: Gemma's post_attention_layernorm follows
# attention (llama.cpp's post_attention_norm) and its FFN has its own pre-norm; Phi-3's ffn_up
# holds gate and up
_GGUF_ARCH_NAMES = {
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
}


# RoPE's frequency tables some files store: read into the spec, not weights
_GGUF_ROPE_TABLES = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two RoPE halves of each Q/K head (its rotation pairs
    # adjacent dims); put them back in transformers' rotate-half order.
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class GGUFCheckpoint:
    """One .gguf file. Quantized matrices come as they are stored where the engine holds that
    format (qweights.from_gguf), else dequantized by the gguf package."""

    def __init__(self, path: Path):
        import gguf

        self._gguf, self.path = gguf, path
        try:
            self.meta, self.tensor_table = read_header(path)
        except (OSError, ValueError) as e:
            raise XQError(f"{path.name} is truncated or not a valid GGUF file ({e})") from None
        by_name = {t.name: t for t in self.tensor_table}
        floats = ("F32", "F16", "BF16")
        self.quantized = any(t.tensor_type.name not in floats for t in self.tensor_table)
        # Phi-3 stores LongRoPE's short and long factors
        tables = [
            by_name.get("rope_freqs.weight") or by_name.get("rope_factors_short.weight"),
            by_name.get("rope_factors_long.weight"),
        ]
        rope_freqs, long_freqs = (
            None if t is None else self._values(t, self._raw(t)) for t in tables
        )
        self.spec = ModelSpec.from_gguf(self.meta, set(by_name), rope_freqs, long_freqs)

    def _raw(self, t, file=None) -> np.ndarray:
        """A tensor's bytes as stored, read from the file (not mapped: see `tensors`)."""
        raw = np.empty(t.n_bytes, dtype=np.uint8)
        with contextlib.nullcontext(file) if file else open(self.path, "rb") as f:
            f.seek(t.data_offset)
            if f.readinto(memoryview(raw)) != raw.size:
                raise XQError(f"{self.path.name} is truncated; download it again")
        return raw

    def _values(self, t, raw: np.ndarray) -> np.ndarray:
        """A tensor's values as float32, in transformers' shape."""
        shape = tuple(reversed(t.shape))
        return self._gguf.quants.dequantize(raw, t.tensor_type).reshape(shape).astype(np.float32)

    def _named(self):
        """(HF name, GGUF kind, tensor) for every weight tensor."""
        names = _GGUF_NAMES | _GGUF_ARCH_NAMES.get(self.spec.arch, {})
        for t in self.tensor_table:
            if t.name in _GGUF_ROPE_TABLES:
                continue
            parts = t.name.split(".")
            if parts[0] == "blk":
                yield f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}", parts[2], t
            else:
                yield f"{names[parts[0]]}.{parts[1]}", parts[0], t

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in transformers' order (GGUF lists dimensions innermost first)."""
        shapes = {hf: tuple(reversed(t.shape)) for hf, _, t in self._named()}
        return canonical_shapes(self.spec, shapes)

    def tensors(self, packed: bool = False) -> Iterator[tuple[str, np.ndarray | Packed]]:
        """(HF name, float32 array), or with `packed` a qweights.Packed for each matrix whose type
        maps. Each tensor's bytes are read from the file as it comes, and dropped after, so
        loading never holds the file's pages and the engine's copy at once."""
        return canonical(self.spec, self._stored(packed), norms_from_one=False)

    def _stored(self, packed: bool) -> Iterator[tuple[str, np.ndarray | Packed]]:
        spec = self.spec
        with open(self.path, "rb") as f:
            for hf, kind, t in self._named():
                raw = self._raw(t, f)
                shape = tuple(reversed(t.shape))
                w = None
                if packed and len(shape) == 2:
                    w = qweights.from_gguf(t.tensor_type.name, raw, shape)
                if w is None:
                    w = self._values(t, raw)
                if spec.arch in ("llama", "smollm3") and kind in ("attn_q", "attn_k"):
                    heads = spec.n_heads if kind == "attn_q" else spec.n_kv_heads
                    rows = _unpermute(np.arange(shape[0]), heads)
                    w = w[rows] if isinstance(w, np.ndarray) else w.take_rows(rows)
                yield hf, w


def open_checkpoint(files: ModelFiles) -> SafetensorsCheckpoint | GGUFCheckpoint:
    if files.format == "gguf":
        return GGUFCheckpoint(files.path)
    return SafetensorsCheckpoint(files.path)


def engine_layout(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """The engine's tensor names (the same in both backends) -> the checkpoint tensors
    (transformers' names) concatenated along dim 0 to make each: K/V become one `wkv` (a cache
    that holds X rebuilds both with one matmul) and gate/up one `w13`."""
    layout = {"embed.weight": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",)}
    if not spec.tied_embeddings:
        layout["lm_head.weight"] = ("lm_head.weight",)
    for i in range(spec.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        layout[ours + "attention.wq.weight"] = (attn + "q_proj.weight",)
        layout[ours + "attention.wkv.weight"] = (attn + "k_proj.weight", attn + "v_proj.weight")
        if spec.qkv_bias:
            layout[ours + "attention.wq.bias"] = (attn + "q_proj.bias",)
            layout[ours + "attention.wkv.bias"] = (attn + "k_proj.bias", attn + "v_proj.bias")
        layout[ours + "attention.wo.weight"] = (attn + "o_proj.weight",)
        if spec.qk_norm:
            layout[ours + "attention.q_norm.weight"] = (attn + "q_norm.weight",)
            layout[ours + "attention.k_norm.weight"] = (attn + "k_norm.weight",)
        layout[ours + "feed_forward.w13.weight"] = (
            hf + "mlp.gate_proj.weight",
            hf + "mlp.up_proj.weight",
        )
        layout[ours + "feed_forward.w2.weight"] = (hf + "mlp.down_proj.weight",)
        layout[ours + "attention_norm.weight"] = (hf + "input_layernorm.weight",)
        if spec.gemma:  # norms after attention and the FFN too, and a pre-FFN norm of its own
            layout[ours + "post_attention_norm.weight"] = (hf + "post_attention_layernorm.weight",)
            layout[ours + "ffn_norm.weight"] = (hf + "pre_feedforward_layernorm.weight",)
            layout[ours + "post_ffn_norm.weight"] = (hf + "post_feedforward_layernorm.weight",)
        else:
            layout[ours + "ffn_norm.weight"] = (hf + "post_attention_layernorm.weight",)
    return layout


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape every checkpoint tensor `engine_layout` reads must have, by transformers' name."""
    q, kv, d, h = spec.n_heads * spec.head_dim, spec.kv_dim, spec.dim, spec.hidden_dim
    by_module = {
        "embed_tokens.weight": (spec.vocab_size, d),
        "lm_head.weight": (spec.vocab_size, d),
        "q_proj.weight": (q, d),
        "k_proj.weight": (kv, d),
        "v_proj.weight": (kv, d),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "o_proj.weight": (d, q),
        "q_norm.weight": (spec.head_dim,),
        "k_norm.weight": (spec.head_dim,),
        "gate_proj.weight": (h, d),
        "up_proj.weight": (h, d),
        "down_proj.weight": (d, h),
        "norm.weight": (d,),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "pre_feedforward_layernorm.weight": (d,),
        "post_feedforward_layernorm.weight": (d,),
    }
    names = [name for sources in engine_layout(spec).values() for name in sources]
    return {name: by_module[".".join(name.split(".")[-2:])] for name in names}


def check_shapes(checkpoint: SafetensorsCheckpoint | GGUFCheckpoint) -> None:
    """Refuse a checkpoint whose tensors are missing or do not fit its own config."""
    shapes = checkpoint.shapes()
    for name, shape in expected_shapes(checkpoint.spec).items():
        if name not in shapes:
            raise XQError(f"the checkpoint lacks the tensor {name}")
        if shapes[name] != shape:
            raise XQError(
                f"the tensor {name} has shape {list(shapes[name])}, but the config implies {list(shape)}"
            )


def to_engine_layout(weights: dict, spec: ModelSpec, concatenate, skip=()) -> dict:
    """Apply `engine_layout` to framework tensors; `concatenate(list) -> tensor` joins along dim 0.
    Consumes `weights`; refuses missing or unexpected tensors with a clear message. `skip`: engine
    names made elsewhere (quantized matrices: qweights.engine_packed)."""
    out = {}
    for name, sources in engine_layout(spec).items():
        if name in skip:
            continue
        missing = [s for s in sources if s not in weights]
        if missing:
            raise XQError(f"the checkpoint lacks the tensor {missing[0]}")
        parts = [weights.pop(s) for s in sources]
        out[name] = parts[0] if len(parts) == 1 else concatenate(parts)
    if spec.tied_embeddings:
        weights.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
    leftover = [k for k in weights if "rotary_emb" not in k]
    if leftover:
        raise XQError(f"unexpected tensor in the checkpoint: {leftover[0]}")
    return out


def as_mha(spec: ModelSpec, name: str, array: np.ndarray | Packed) -> np.ndarray | Packed:
    """A GQA model's tensor in its exact MHA form: each K/V head repeated for the query heads
    that share it (attention is unchanged; the cache grows to one K/V head per query head)."""
    if not name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        return array
    if isinstance(array, Packed):  # the same rows of codes, scales and mins
        return array.take_rows(as_mha(spec, name, np.arange(array.shape[0])))
    heads = array.reshape(spec.n_kv_heads, spec.head_dim, *array.shape[1:])
    return np.repeat(heads, spec.n_heads // spec.n_kv_heads, axis=0).reshape(-1, *array.shape[1:])
