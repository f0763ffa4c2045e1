"""GGUF files (llama.cpp): metadata -> config dict, dequantized tensors -> our names, and the tokenizer.

Reading goes through the ``gguf`` package (imported lazily): ``GGUFReader`` memory-maps the file and
``gguf.quants.dequantize`` turns F32, F16, BF16, Q8_0, Q4_0 and Q4_1 blocks into float32. Any other quantization is
refused with an error that names the type, the tensor and the file. Names go through
:data:`weights.names.GGUF_LLAMA` (undoing llama.cpp's q/k row permutation) or :data:`weights.names.GGUF_GPT2`; a file
without ``output.weight`` has a head tied to ``token_embd``.

The tokenizer: a GGUF has no tokenizer.json, only ``tokenizer.ggml.*`` metadata (tokens in GPT-2's byte-to-unicode
spelling, merges, token types, special ids). For ``tokenizer.ggml.model == "gpt2"`` we build an HF ``tokenizers``
byte-level BPE from them, with control tokens (type 3) added as special tokens, as transformers does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weights.names import GGUF_GPT2, GGUF_LLAMA, apply_table
from weights.store import ImportedModel

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's split pattern, for ``tokenizer.ggml.pre`` llama-bpe/llama3."""
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}
_GPT2_STYLE = ("default", "gpt-2", "gpt2", "smollm", "starcoder", "refact")
"""Pre-tokenizers served by GPT-2's ByteLevel regex. For ``smollm``, llama.cpp (and SmolLM2's own tokenizer.json)
first isolate every digit; transformers' GGUF loader (5.23) does not, and we match transformers as our test demands.
The vocabulary has no merge that involves a digit, so the two agree except where a run of 2+ whitespace characters
directly precedes a digit: "\n\n1." gives [Ċ, Ċ, 1, .] here and [ĊĊ, 1, .] with digit isolation."""


def _open(path: str | Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({' '.join(str(e).split())}); re-download it") from None


def metadata(reader) -> dict[str, Any]:
    """All key/value metadata as Python values (token lists included)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # an exotic field type we do not need must not stop the import
            log.debug("skipping GGUF field %s", key)
    return out


def _f32(value: float) -> float:
    # GGUF stores floats as float32 (1e-5 becomes 9.99999974738e-06); keep the shortest decimal that round-trips.
    return float(str(np.float32(value)))


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], source: str) -> dict[str, Any]:
    """Our config dict from GGUF metadata (architectures llama and gpt2)."""
    arch = meta.get("general.architecture")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata {arch}.{key} is missing; the GGUF is incomplete")
        return value

    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        raise ValueError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size or tokenizer tokens)")
    tie = "output.weight" not in tensor_names
    if arch == "llama":
        d, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        rot = meta.get("llama.rope.dimension_count")
        if rot is not None and int(rot) != d // n_heads:
            raise ValueError(f"{source}: partial rotary embeddings (rope.dimension_count {rot} != head_dim "
                             f"{d // n_heads}) are not supported")
        scaling_type = meta.get("llama.rope.scaling.type", "none")
        if scaling_type not in ("none", "linear"):
            raise ValueError(f"{source}: RoPE scaling {scaling_type!r} is not supported; only linear")
        if "rope_freqs.weight" in tensor_names:
            raise ValueError(f"{source}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported")
        return {
            "vocab_size": int(vocab), "context_length": int(get("context_length")), "d_model": d,
            "n_layers": int(get("block_count")), "n_heads": n_heads,
            "n_kv_heads": int(meta.get("llama.attention.head_count_kv") or n_heads),
            "ffn_dim": int(get("feed_forward_length")), "norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope",
            "rope_base": _f32(meta.get("llama.rope.freq_base", 10000.0)),
            "rope_scaling": _f32(get("rope.scaling.factor")) if scaling_type == "linear" else None,
            "norm_eps": _f32(get("attention.layer_norm_rms_epsilon")), "bias": False, "qkv_bias": False,
            "tie_embeddings": tie, "dropout": 0.0,
        }
    if arch == "gpt2":
        d, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        return {
            "vocab_size": int(vocab), "context_length": int(get("context_length")), "d_model": d,
            "n_layers": int(get("block_count")), "n_heads": n_heads, "n_kv_heads": n_heads,
            "ffn_dim": int(get("feed_forward_length")), "norm": "layernorm", "mlp": "gelu", "pos_emb": "learned",
            "rope_base": 10000.0, "rope_scaling": None, "norm_eps": _f32(get("attention.layer_norm_epsilon")),
            "bias": True, "qkv_bias": True, "tie_embeddings": tie, "dropout": 0.0,
        }
    raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; only llama and gpt2")


def _check_types(reader, source: str) -> None:
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported GGUF quantization {t.tensor_type.name} in tensor {t.name} of {source}; "
                             f"supported: {', '.join(SUPPORTED_TYPES)} (re-quantize with llama.cpp to one of them)")


def _tensors(reader, source: str) -> dict[str, torch.Tensor]:
    import gguf

    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists dims fastest-first; torch (out, in)
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # F16/BF16 too
        if not array.flags.writeable:  # F32 data is a view of the read-only mmap
            array = array.copy()
        out[t.name] = torch.from_numpy(array.reshape(shape))
    return out


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a GGUF file -> (config dict, canonical float32 state dict)."""
    config, state, _ = _read(path)
    return config, state


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    reader = _open(path)
    source = str(path)
    _check_types(reader, source)  # refuse before doing any work
    meta = metadata(reader)
    config = config_from_metadata(meta, {t.name for t in reader.tensors}, source)
    tensors = _tensors(reader, source)
    head, emb = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if head is not None and emb is not None and torch.equal(head, emb):
        # llama.cpp's GPT-2 converter writes the tied head out as a copy; store it once
        del tensors["output.weight"]
        config["tie_embeddings"] = True
    table = GGUF_LLAMA if config["pos_emb"] == "rope" else GGUF_GPT2
    return config, apply_table(tensors, table, config, source), meta


def build_tokenizer(meta: dict[str, Any], source: str):
    """An HF ``tokenizers.Tokenizer`` (byte-level BPE) from GGUF tokenizer metadata.

    Raises:
        ValueError: the tokenizer is not byte-level BPE (``tokenizer.ggml.model != "gpt2"``).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                         f"pass --tokenizer-dir with the model's tokenizer.json")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_STYLE:
            log.warning("%s: unknown tokenizer.ggml.pre %r; using GPT-2's split pattern", source, pre)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tk


def tokenizer_files(meta: dict[str, Any], context_length: int, source: str) -> tuple[dict[str, Any], dict]:
    """The manifest tokenizer dict and files (tokenizer.json, tokenizer_config.json) for a GGUF's tokenizer."""
    tk = build_tokenizer(meta, source)
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    specials = [t for t, ty in zip(tokens, types) if ty == CONTROL]

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = tk.token_to_id("<|endoftext|>")
    if eot is not None and "<|endoftext|>" in specials and eot not in eos_ids:
        eos_ids.append(eot)  # end of a document: stop there too
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
        "bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id"), "unk_token": tok("unknown_token_id"),
        "pad_token": tok("padding_token_id"), "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    tokenizer = {
        "type": "hf", "files": {"tokenizer_json": "tokenizer.json", "tokenizer_config_json": "tokenizer_config.json"},
        "eos_token_ids": eos_ids,
        # the id the engine prepends; None when the model is not trained with one (SmolLM2: add_bos_token false)
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]) if add_bos else None,
        "add_bos_token": add_bos, "special_tokens": specials,
    }
    files = {"tokenizer.json": tk.to_str().encode("utf-8"),
             "tokenizer_config.json": (json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}
    return tokenizer, files


def read_for_import(path: Path) -> ImportedModel:
    """:func:`read` plus the tokenizer files and a prompt-format hint (chatml for a ChatML chat template)."""
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"{path}: expected exactly one .gguf file, found {len(ggufs)}; pass the file itself")
        path = ggufs[0]
    config, state, meta = _read(path)
    tokenizer: dict[str, Any] = {"type": "none"}
    files: dict = {}
    try:
        tokenizer, files = tokenizer_files(meta, config["context_length"], str(path))
    except ValueError as e:
        log.warning("%s", e)
    hint = "chatml" if "<|im_start|>" in str(meta.get("tokenizer.chat_template") or "") else None
    return ImportedModel(config=config, state_dict=state, source={"format": "gguf", "path": str(path)},
                         tokenizer=tokenizer, files=files, prompt_format=hint)
