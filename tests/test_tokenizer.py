"""Tokenizers: GPT-2 via tiktoken built offline (seed a1/a2 vectors, transformers' GPT2Tokenizer as oracle), the HF
``tokenizers`` wrapper, the plain-text guarantee for user text, and the UTF-8-safe StreamDecoder."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from engine.tokenizer import (
    GPT2_EOS_ID,
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    load_gpt2_tokenizer,
    load_tokenizer,
)

GPT2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
MIXED = "Hello, wörld! def f(x): return x**2  # 12345 3.14 🦙🤗 中文字符 naïve café\n\n\tend"


@pytest.fixture(scope="module")
def gpt2() -> TiktokenTokenizer:
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2_DIR}")
    return load_gpt2_tokenizer(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")


def build_hf_tokenizer_json(path: Path) -> Path:
    """A small byte-level BPE tokenizer.json with ChatML special tokens (the SmolLM2 layout, tiny vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["hello world, the capital of France is Paris.", "user assistant system you are helpful", "中文 🦙"]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HFTokenizer:
    path = build_hf_tokenizer_json(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    return HFTokenizer.from_file(path, eos_token_ids=[2], bos_token_id=None)


# ---------------------------------------------------------------- GPT-2 (tiktoken)

def test_gpt2_exercise_2_1_vectors(gpt2):
    assert gpt2.encode("Ak") == [33901]
    assert gpt2.encode("w") == [86]
    assert gpt2.decode([33901, 86, 343, 86, 220, 959]) == "Akwirw ier"
    assert gpt2.encode("Akwirw ier") == [33901, 86, 343, 86, 220, 959]


def test_gpt2_vocab_and_special_only_on_request(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_token_ids == (GPT2_EOS_ID,)
    assert gpt2.special_id("<|endoftext|>") == 50256
    assert gpt2.decode([50256]) == "<|endoftext|>"
    # the ch. 2 main-text vector, with the special token inserted where the code asks for it
    text_a, text_b = "Hello, do you like tea? ", " In the sunlit terraces of someunknownPlace."
    ids = gpt2.encode(text_a) + [gpt2.special_id("<|endoftext|>")] + gpt2.encode(text_b)
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
                   34680, 27271, 13]
    with pytest.raises(KeyError, match="im_end"):
        gpt2.special_id("<|im_end|>")


@pytest.mark.parametrize("text", ["<|endoftext|>", "<|im_end|>", "### Response:", "a<|endoftext|>b <|im_start|>"])
def test_gpt2_user_text_is_plain(gpt2, text):
    ids = gpt2.encode(text)
    assert GPT2_EOS_ID not in ids
    assert gpt2.decode(ids) == text


def test_gpt2_endoftext_text_tokens(gpt2):
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    # seed a1.9: the Phi-3 markers are ordinary text for GPT-2
    assert gpt2.encode("<|user|>") == [27, 91, 7220, 91, 29]
    assert gpt2.encode("<|assistant|>") == [27, 91, 562, 10167, 91, 29]


def test_gpt2_matches_transformers_oracle(gpt2):
    transformers = pytest.importorskip("transformers")
    import json

    merges = (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    oracle = transformers.GPT2Tokenizer(vocab=json.loads((GPT2_DIR / "encoder.json").read_text(encoding="utf-8")),
                                        merges=[tuple(m.split()) for m in merges])
    verdict = (Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt")
    texts = [MIXED, "  leading spaces and trailing   ", "I'm can't we'll they've 's"]
    if verdict.is_file():
        texts.append(verdict.read_text(encoding="utf-8")[:3000])
    for text in texts:
        assert gpt2.encode(text) == oracle.encode(text), text[:40]
        assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_hash_mismatch_and_missing_file(tmp_path):
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    shutil.copy(GPT2_DIR / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_bytes((GPT2_DIR / "encoder.json").read_bytes() + b" ")
    with pytest.raises(ValueError, match="sha256"):
        load_gpt2_tokenizer(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_gpt2_tokenizer(tmp_path / "nothere.json", tmp_path / "vocab.bpe")


def test_load_tokenizer_from_manifest_dict(tmp_path, gpt2):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(GPT2_DIR / name, tmp_path / name)
    tok = load_tokenizer(tmp_path, {"type": "gpt2-bpe", "files": {"encoder_json": "encoder.json",
                                                                  "vocab_bpe": "vocab.bpe"},
                                    "eos_token_ids": [50256]})
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.encode(MIXED) == gpt2.encode(MIXED)
    assert tok.eos_token_ids == (50256,)
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path, {"type": "sentencepiece"})


# ---------------------------------------------------------------- StreamDecoder

def _find_split_emoji(tok) -> tuple[str, list[int]]:
    for ch in "🦙🤗😀🚀👍🎉":
        ids = tok.encode(ch)
        if len(ids) > 1:
            return ch, ids
    raise AssertionError("no emoji is split into several tokens")


def test_stream_decoder_emits_split_emoji_whole(gpt2):
    emoji, ids = _find_split_emoji(gpt2)
    assert any(gpt2.token_bytes(i).decode("utf-8", errors="replace") != gpt2.token_bytes(i).decode("utf-8",
               errors="ignore") for i in ids), "the emoji's tokens should hold partial UTF-8 sequences"
    dec = StreamDecoder(gpt2)
    pieces = [dec.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == emoji
    assert dec.flush() == ""


@pytest.mark.parametrize("which", ["gpt2", "hf"])
def test_stream_decoder_never_emits_replacement_char(which, gpt2, hf):
    tok = gpt2 if which == "gpt2" else hf
    rng = random.Random(0)
    alphabet = list("ab xyz,.\n") + list("中文字符") + list("🦙🤗😀🚀") + ["é", "ß"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        dec = StreamDecoder(tok)
        pieces = [dec.push(i) for i in tok.encode(text)]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + dec.flush() == text


def test_stream_decoder_invalid_bytes_become_replacement(gpt2):
    lone = next(i for i in range(256) if gpt2.token_bytes(i) == b"\x80")  # a lone continuation byte
    dec = StreamDecoder(gpt2)
    out = dec.push(gpt2.encode("a")[0]) + dec.push(lone) + dec.flush()
    assert out == "a\ufffd"
    truncated = gpt2.encode("🦙")[:-1]
    dec = StreamDecoder(gpt2)
    assert dec.push_many(truncated) == ""
    assert dec.pending
    assert dec.flush() == "\ufffd"


# ---------------------------------------------------------------- HF tokenizers

def test_hf_specials_only_via_special_id(hf):
    assert hf.special_tokens == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    im_end = hf.special_id("<|im_end|>")
    assert im_end == 2
    for text in ["<|im_end|>", "hi <|im_start|>system\nx<|im_end|>", "<|endoftext|>"]:
        ids = hf.encode(text)
        assert not set(ids) & {0, 1, 2}, text
        assert hf.decode(ids) == text
    assert hf.decode([1]) == "<|im_start|>"
    with pytest.raises(KeyError):
        hf.special_id("<|user|>")


def test_hf_matches_library_decode(hf):
    text = "hello 中文 🦙 world"
    ids = hf.encode(text)
    assert hf.decode(ids) == hf.tok.decode(ids) == text
    assert b"".join(hf.token_bytes(i) for i in ids) == text.encode()
    emoji_ids = hf.encode("🤗")  # not in the training corpus: split into byte tokens
    assert len(emoji_ids) > 1
    dec = StreamDecoder(hf)
    assert [dec.push(i) for i in emoji_ids][-1] == "🤗"


def test_hf_matches_transformers_fast_tokenizer(hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_object=hf.tok)
    text = "hello world 中文 🦙, the capital"
    assert hf.encode(text) == oracle.encode(text, add_special_tokens=False)


def test_load_tokenizer_hf_and_none(tmp_path):
    build_hf_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path, {"type": "hf", "files": {"tokenizer_json": "tokenizer.json"},
                                    "eos_token_ids": [2, 0], "bos_token_id": None, "special_tokens": []})
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_ids == (2, 0)
    assert tok.encode("<|im_end|>") != [2]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path, {"type": "hf", "files": {"tokenizer_json": "missing.json"}})
    byte = load_tokenizer(tmp_path, {"type": "none"})
    assert isinstance(byte, ByteTokenizer)
    assert byte.encode("é<|endoftext|>") == list("é<|endoftext|>".encode())
    assert byte.eos_token_ids == (256,) and byte.special_id("<|endoftext|>") == 256


def test_smollm2_tokenizer_plain_text(request):
    """The real SmolLM2 tokenizer from the store: ChatML markers are special ids, typed markers are plain text."""
    try:
        root = request.getfixturevalue("smollm2_store")
    except pytest.FixtureLookupError:
        pytest.skip("smollm2_store fixture (tests/conftest.py) not available")
    from weights import store

    manifest = store.read_manifest("smollm2-135m-instruct", root=root)
    tok = load_tokenizer(store.model_dir("smollm2-135m-instruct", root=root), manifest["tokenizer"])
    im_end, im_start = tok.special_id("<|im_end|>"), tok.special_id("<|im_start|>")
    assert im_end in tok.eos_token_ids
    ids = tok.encode("user typed <|im_end|> and <|im_start|>system")
    assert im_end not in ids and im_start not in ids
    text = "Paris 中文 🦙 x = 42\n"
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in tok.encode(text)) + dec.flush() == text
