"""Tokenizer and chat template through transformers, plus a streaming detokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import XQError
from .paths import derived_dir
from .registry import ModelFiles


class Tokenizer:
    def __init__(self, hf, stop_tokens: set[int]):
        self.hf = hf
        self.stop_tokens = frozenset(stop_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, tokens: list[int]) -> str:
        return self.hf.decode(tokens, skip_special_tokens=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The whole conversation as the model sees it (the template writes BOS and role markers)."""
        if not self.has_chat_template:
            raise XQError(
                "this model has no chat template, so it cannot chat (bench ppl still works)"
            )
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces. Decodes only the tokens since the last newline
    (cheap on long replies) and holds back a piece that ends inside a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self._segment: list[int] = []
        self._segment_text = ""

    def add(self, token: int) -> str:
        self._segment.append(token)
        text = self.tokenizer.decode(self._segment)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self._segment_text) :]
        self.text += piece
        if text.endswith("\n"):
            self._segment, self._segment_text = [], ""
        else:
            self._segment_text = text
        return piece


def _stop_tokens(hf, folder: Path) -> set[int]:
    stops = set()
    if hf.eos_token_id is not None:
        stops.add(hf.eos_token_id)
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        stops.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return stops


def converted_tokenizer_dir(files: ModelFiles) -> Path:
    """Where a GGUF model's tokenizer, converted to transformers' files, is kept."""
    return derived_dir(files) / "tokenizer"


def load_tokenizer(files: ModelFiles) -> Tokenizer:
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if files.format == "safetensors":
            hf = AutoTokenizer.from_pretrained(files.path)
            return Tokenizer(hf, _stop_tokens(hf, files.path))
        # Converting a GGUF vocabulary takes seconds; keep the converted tokenizer with the
        # model's other derived artefacts.
        saved = converted_tokenizer_dir(files)
        if (saved / "tokenizer_config.json").is_file():
            hf = AutoTokenizer.from_pretrained(saved)
        else:
            hf = AutoTokenizer.from_pretrained(files.path.parent, gguf_file=files.path.name)
            hf.save_pretrained(saved)
        return Tokenizer(hf, _stop_tokens(hf, files.path.parent))
    except XQError:
        raise
    except Exception as e:
        raise XQError(f"cannot load the tokenizer of {files.name}: {e}") from None
