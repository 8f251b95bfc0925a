"""Tokenizer and chat template through transformers, plus a streaming detokenizer."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from .errors import XQError
from .paths import derived_dir
from .registry import ModelFiles

REPLACEMENT = "\ufffd"  # U+FFFD, what Unicode prescribes for undecodable input
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]+")


def _decode_escaped(match: re.Match[str]) -> str:
    # U+DC80..U+DCFF stand for the bytes 0x80..0xFF that a surrogateescape decoding could not
    # read (Python decodes argv, and stdin in some locales, that way). A run of them holds any
    # whole UTF-8 sequences of its own (those bytes are all >= 0x80), which this decodes; the
    # bytes that are still invalid stay escaped.
    data = bytes(ord(c) - 0xDC00 for c in match.group())
    return data.decode("utf-8", "surrogateescape")


def valid_text(text: str) -> tuple[str, int]:
    """`text` with nothing a tokenizer refuses, and how many characters were replaced.

    A Python str may hold surrogate code points, which no encoder accepts (the Rust tokenizers
    raise a TypeError): bytes that were not valid UTF-8 when argv or stdin was decoded with
    surrogateescape, or lone surrogates from JSON escapes (`"\\ud800"`). Valid pairs are joined
    into the character they encode, escaped bytes are decoded again as UTF-8, and each one left
    (an invalid byte, a lone surrogate) becomes U+FFFD, so the rest of the text is kept."""
    if not _SURROGATE.search(text):
        return text, 0
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    text = _ESCAPED_BYTE.sub(_decode_escaped, text)
    return _SURROGATE.subn(REPLACEMENT, text)


class Tokenizer:
    def __init__(self, hf, stop_tokens: set[int]):
        self.hf = hf
        self.stop_tokens = frozenset(stop_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str) -> list[int]:
        # Every path to the model comes through here (prompts, rendered chats, corpora), so none
        # can raise on surrogates; the front ends say when they replaced something.
        return self.hf.encode(valid_text(text)[0], add_special_tokens=False)

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


# What chat templates end a turn with (Gemma, Phi-3, ChatML as in SmolLM, Llama 3): a GGUF names
# only its end-of-text token, and a folder may lack generation_config.json, which lists these.
END_OF_TURN = ("<end_of_turn>", "<|end|>", "<|im_end|>", "<|eot_id|>")


def _stop_tokens(hf, folder: Path) -> set[int]:
    stops = set()
    if hf.eos_token_id is not None:
        stops.add(hf.eos_token_id)
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        stops.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    template = hf.chat_template if isinstance(hf.chat_template, str) else ""
    for marker in END_OF_TURN:
        ids = hf.encode(marker, add_special_tokens=False) if marker in template else []
        if len(ids) == 1:
            stops.add(ids[0])
    return stops


def converted_tokenizer_dir(files: ModelFiles) -> Path:
    """Where a GGUF model's tokenizer, converted to transformers' files, is kept."""
    return derived_dir(files) / "tokenizer"


def _gguf_tokenizer(path: Path):
    """A GGUF's own tokenizer: read from a folder holding only (a link to) the file, since
    transformers prefers a tokenizer_config.json beside it, another model's where GGUFs are
    kept together with other files."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as alone:
        try:
            (Path(alone) / path.name).symlink_to(path.resolve())
            folder = Path(alone)
        except OSError:  # no symlinks here (some Windows setups): the file's own folder
            folder = path.parent
        return AutoTokenizer.from_pretrained(folder, gguf_file=path.name)


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
            hf = _gguf_tokenizer(files.path)
            hf.save_pretrained(saved)
        return Tokenizer(hf, _stop_tokens(hf, files.path.parent))
    except XQError:
        raise
    except Exception as e:
        raise XQError(f"cannot load the tokenizer of {files.name}: {e}") from None
