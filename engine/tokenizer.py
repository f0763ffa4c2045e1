"""Tokenizers behind one small interface, plus an incremental decoder that never splits a UTF-8 character.

* :class:`TiktokenTokenizer`: GPT-2's byte-level BPE through tiktoken (Raschka ch. 2; seed facts a1/a2), built
  offline from ``encoder.json`` + ``vocab.bpe`` with tiktoken's own loader and its published sha256 hashes
  (``tiktoken.get_encoding("gpt2")`` would download the same two files at run time).
* :class:`HFTokenizer`: a HF ``tokenizers`` ``tokenizer.json`` (SmolLM2 and other Llama-style models).
* :class:`ByteTokenizer`: raw UTF-8 bytes (ids 0-255) plus an optional end-of-text id, for ``{"type": "none"}``
  models such as tiny test models with a 257-token vocabulary.

Every ``encode(text)`` treats its input as plain text: a user who types ``<|endoftext|>`` or ``<|im_end|>`` gets the
ordinary tokens of those characters, never the special id. Special ids are reachable only through
:meth:`Tokenizer.special_id`, which :mod:`engine.prompts` uses for template markers.

:class:`StreamDecoder` works on token *bytes* with an incremental UTF-8 decoder, so an emoji or CJK character whose
bytes are spread over several byte-level BPE tokens is emitted whole (cf. litgpt tokenizer.py ``decode_stream``).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
GPT2_EOS_ID = 50256

# tiktoken's published hashes for OpenAI's GPT-2 encoding files (tiktoken_ext/openai_public.py, ``gpt2()``).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer regex as tiktoken writes it (equivalent to the original, faster).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """The interface every tokenizer implements (the engine and finetune code use only this).

    Attributes:
        eos_token_ids: ids that end generation (GPT-2: (50256,); SmolLM2: <|im_end|> and <|endoftext|>).
        bos_token_id: id prepended by models that want one, else None.
        vocab_size: number of ids the tokenizer can produce (the model's embedding may be larger).
        special_tokens: strings that are special tokens of this vocabulary (reachable only via ``special_id``).
    """

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    vocab_size: int = 0
    special_tokens: frozenset[str] = frozenset()

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` as plain text: special-token strings inside it are ordinary characters."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text (special tokens are rendered as their strings; bad UTF-8 becomes U+FFFD)."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one id stands for (may be part of a multi-byte UTF-8 character)."""
        raise NotImplementedError

    def special_id(self, token: str) -> int:
        """Id of a special token, e.g. ``special_id("<|endoftext|>") == 50256`` for GPT-2.

        Raises:
            KeyError: the token is not a special token of this vocabulary.
        """
        raise NotImplementedError

    def is_special(self, token: str) -> bool:
        return token in self.special_tokens


class TiktokenTokenizer(Tokenizer):
    """GPT-2 BPE through a ``tiktoken.Encoding``."""

    def __init__(self, encoding: Any, eos_token_ids: Sequence[int] = (GPT2_EOS_ID,)) -> None:
        self.encoding = encoding
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.bos_token_id = None
        self.vocab_size = encoding.n_vocab
        self.special_tokens = frozenset(encoding.special_tokens_set)
        self._decode_bytes = encoding.decode_single_token_bytes

    def encode(self, text: str) -> list[int]:
        # encode_ordinary == encode(text, allowed_special=(), disallowed_special=()): "<|endoftext|>" in the text is
        # split like any other characters instead of raising or becoming 50256.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._decode_bytes(token_id)

    def special_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of this tokenizer (known: {sorted(self.special_tokens)})")
        return self.encoding.encode_single_token(token)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> byte (GPT-2 encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers.Tokenizer`` (``tokenizer.json``), with special tokens never matched in user text."""

    def __init__(self, tok: Any, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None) -> None:
        self.tok = tok
        # The tokenizers library matches added special tokens inside input text unless this flag is set; with it
        # they are split like ordinary text, which is what "user text is always plain text" needs.
        self.tok.encode_special_tokens = True
        added = tok.get_added_tokens_decoder()  # {id: AddedToken}
        self._special = {t.content: i for i, t in added.items() if t.special}
        self._added_bytes = {i: t.content.encode("utf-8") for i, t in added.items()}
        self.special_tokens = frozenset(self._special)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.bos_token_id = bos_token_id
        config = json.loads(tok.to_str())
        self._byte_level = _is_byte_level(config.get("decoder")) or _is_byte_level(config.get("pre_tokenizer"))
        self._cache: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> HFTokenizer:
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; the model folder needs its tokenizer.json")
        return cls(_HFTok.from_file(str(path)), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_bytes:
            out = self._added_bytes[token_id]
        else:
            piece = self.tok.id_to_token(token_id)
            if piece is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary of size {self.vocab_size}")
            out = _piece_to_bytes(piece, self._byte_level, self.tok, token_id)
        self._cache[token_id] = out
        return out

    def special_id(self, token: str) -> int:
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer (known: {sorted(self._special)})")


def _is_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    parts = component.get("decoders") or component.get("pretokenizers") or []
    return any(_is_byte_level(p) for p in parts)


def _piece_to_bytes(piece: str, byte_level: bool, tok: Any, token_id: int) -> bytes:
    if byte_level:
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            pass  # not a byte-level piece (e.g. a non-special added token): fall through
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    if "\u2581" in piece:  # SentencePiece metaspace
        return piece.replace("\u2581", " ").encode("utf-8")
    return tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255; id 256 is ``<|endoftext|>`` when the vocabulary has room for it."""

    def __init__(self, vocab_size: int = 257, eos_token_ids: Sequence[int] | None = None) -> None:
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs vocab_size >= 256, got {vocab_size}")
        self.vocab_size = vocab_size
        self.special_tokens = frozenset({ENDOFTEXT}) if vocab_size > 256 else frozenset()
        default_eos = (256,) if vocab_size > 256 else ()
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else default_eos

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < 256:
            return bytes([token_id])
        if token_id == 256 and self.vocab_size > 256:
            return ENDOFTEXT.encode()
        return b""

    def special_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of this tokenizer")
        return 256


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_gpt2_tokenizer(encoder_json: str | Path, vocab_bpe: str | Path, *, verify: bool = True) -> TiktokenTokenizer:
    """Build GPT-2's tiktoken encoding offline from local ``encoder.json`` and ``vocab.bpe``.

    Args:
        encoder_json: path to OpenAI's ``encoder.json``.
        vocab_bpe: path to OpenAI's ``vocab.bpe``.
        verify: check both files against tiktoken's published sha256 hashes.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file's hash differs from the published one (corrupt or not OpenAI's GPT-2 vocabulary).
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
    for path, expected in ((encoder_json, GPT2_ENCODER_JSON_SHA256), (vocab_bpe, GPT2_VOCAB_BPE_SHA256)):
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file {path} not found; it ships with every OpenAI GPT-2 "
                                    f"checkpoint (python -m weights fetch gpt2-small)")
        if verify and (actual := _sha256(path)) != expected:
            raise ValueError(f"{path} has sha256 {actual}, expected tiktoken's published {expected}; "
                             f"the file is corrupt or not OpenAI's GPT-2 vocabulary, fetch it again")
    # tiktoken's loader checks the hashes again and asserts that encoder.json agrees with the merges.
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256 if verify else None,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256 if verify else None,
    )
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: GPT2_EOS_ID},
        explicit_n_vocab=50257,
    )
    return TiktokenTokenizer(encoding)


def load_tokenizer(model_dir: str | Path, tokenizer: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer a manifest describes (``model.json["tokenizer"]``), with files relative to ``model_dir``.

    Raises:
        ValueError: unknown tokenizer type.
        FileNotFoundError: a listed file is missing.
    """
    model_dir = Path(model_dir)
    kind = tokenizer.get("type")
    files = tokenizer.get("files") or {}
    eos = tokenizer.get("eos_token_ids")
    if kind == "gpt2-bpe":
        tok = load_gpt2_tokenizer(model_dir / files.get("encoder_json", "encoder.json"),
                                  model_dir / files.get("vocab_bpe", "vocab.bpe"))
        if eos:
            tok.eos_token_ids = tuple(int(i) for i in eos)
        return tok
    if kind == "hf":
        return HFTokenizer.from_file(model_dir / files.get("tokenizer_json", "tokenizer.json"),
                                     eos_token_ids=eos or (), bos_token_id=tokenizer.get("bos_token_id"))
    if kind == "none":
        return ByteTokenizer(int(tokenizer.get("vocab_size", 257)), eos_token_ids=eos)
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'gpt2-bpe', 'hf' or 'none'")


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id) -> str`` returns only whole UTF-8 characters.

    Bytes of an incomplete character are held until the token that completes it arrives. Invalid byte sequences
    (which a sampled model can produce) become U+FFFD as in ``bytes.decode(errors="replace")``; ``flush()`` at the
    end releases any dangling partial character the same way.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes(token_id))

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while bytes of an unfinished character are held back."""
        return bool(self._utf8.getstate()[0])
