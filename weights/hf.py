"""Hugging Face safetensors checkpoints: read GPT-2 (Conv1D layout) and Llama folders, write an HF folder.

Reading accepts a ``.safetensors`` file (its folder's config.json is used when present; a bare GPT-2 file is matched
against OpenAI's four sizes), a folder with ``config.json`` + ``model.safetensors``, or a sharded folder with
``model.safetensors.index.json``. ``config.json`` becomes our config dict (ModelConfig field names); names go
through :data:`weights.names.HF_GPT2` / :data:`weights.names.HF_LLAMA`.

Writing (``python -m weights export NAME --to hf --out DIR``) produces config.json + model.safetensors and the
tokenizer files the format allows (GPT-2 BPE -> vocab.json/merges.txt, an HF tokenizer -> tokenizer.json +
tokenizer_config.json), loadable with ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from weights.names import HF_GPT2, HF_LLAMA, apply_table, export_table
from weights.store import ImportedModel, atomic_dir, gpt2_tokenizer_entry, load_safetensors

# OpenAI's GPT-2 sizes by width: (n_layers, n_heads); used for a bare .safetensors file without config.json.
_GPT2_SIZES = {768: (12, 12), 1024: (24, 16), 1280: (36, 20), 1600: (48, 25)}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); fix or re-download the file") from None


def config_from_hf(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our config dict from an HF ``config.json`` (model_type gpt2 or llama)."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in _TANH_GELUS:
            raise ValueError(f"{source}: activation_function {act!r} is not supported; our GPT-2 uses the tanh GELU "
                             f"({', '.join(_TANH_GELUS)})")
        if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
            raise ValueError(f"{source}: non-standard attention scaling is not supported; use a standard GPT-2")
        d = cfg["n_embd"]
        return {
            "vocab_size": cfg["vocab_size"], "context_length": cfg["n_positions"], "d_model": d,
            "n_layers": cfg["n_layer"], "n_heads": cfg["n_head"], "n_kv_heads": cfg["n_head"],
            "ffn_dim": cfg.get("n_inner") or 4 * d, "norm": "layernorm", "mlp": "gelu", "pos_emb": "learned",
            "rope_base": 10000.0, "rope_scaling": None, "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
            "bias": True, "qkv_bias": True, "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
            "dropout": 0.0,
        }
    if model_type == "llama":
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported; Llama uses silu")
        d, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, d // n_heads):
            raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size/num_attention_heads "
                             f"({d // n_heads}) is not supported")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported; only default and linear")
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ValueError(f"{source}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported; "
                             f"both must match")
        return {
            "vocab_size": cfg["vocab_size"], "context_length": cfg.get("max_position_embeddings", 2048),
            "d_model": d, "n_layers": cfg["num_hidden_layers"], "n_heads": n_heads,
            "n_kv_heads": cfg.get("num_key_value_heads") or n_heads, "ffn_dim": cfg["intermediate_size"],
            "norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "rope_base": float(theta),
            "rope_scaling": float(rope["factor"]) if rope_type == "linear" else None,
            "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "bias": mlp_bias, "qkv_bias": attn_bias,
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)), "dropout": 0.0,
        }
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; only gpt2 and llama checkpoints")


def _gpt2_config_from_shapes(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    names = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if "wte.weight" not in names or "wpe.weight" not in names:
        raise ValueError(f"{source}: no config.json next to this file and it is not a GPT-2 checkpoint; put the "
                         f"model's config.json in the same folder")
    vocab, d = names["wte.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in names if k.startswith("h."))
    if _GPT2_SIZES.get(d, (None,))[0] != n_layers:
        raise ValueError(f"{source}: no config.json next to this file and its shape (d_model {d}, {n_layers} "
                         f"layers) is none of OpenAI's GPT-2 sizes; put the model's config.json in the same folder")
    return config_from_hf({"model_type": "gpt2", "vocab_size": vocab, "n_positions": names["wpe.weight"].shape[0],
                           "n_embd": d, "n_layer": n_layers, "n_head": _GPT2_SIZES[d][1],
                           "tie_word_embeddings": "lm_head.weight" not in names}, source)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_load_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: empty weight_map; re-download the checkpoint")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files; save the model with safe_serialization")
    return files


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an HF GPT-2 or Llama checkpoint (file or folder) -> (config dict, canonical state dict)."""
    p = Path(path)
    if p.is_file() and p.name == "model.safetensors.index.json":
        p = p.parent
    folder = p if p.is_dir() else p.parent
    files = _weight_files(p) if p.is_dir() else [p]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_safetensors(f, fix="re-download or re-save the checkpoint"))
    source = str(p)
    if (folder / "config.json").is_file():
        config = config_from_hf(_load_json(folder / "config.json"), str(folder / "config.json"))
    else:
        config = _gpt2_config_from_shapes(tensors, source)
    if config["pos_emb"] == "learned":
        state = apply_table(tensors, HF_GPT2, config, source, strip_prefixes=("transformer.",))
    else:
        state = apply_table(tensors, HF_LLAMA, config, source)
    return config, state


def hf_tokenizer_entry(folder: Path, cfg: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict]:
    """Tokenizer dict + files for a folder holding an HF ``tokenizer.json`` (and maybe tokenizer_config.json)."""
    tok = _load_json(folder / "tokenizer.json")
    tok_cfg = _load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    vocab = dict(tok.get("model", {}).get("vocab") or {})
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    vocab.update(added)

    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    cfg = cfg or {}
    eos = cfg.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    eos_from_tok = token_id(tok_cfg.get("eos_token"))
    if eos_from_tok is not None and eos_from_tok not in eos_ids:
        eos_ids.insert(0, eos_from_tok)
    bos = cfg.get("bos_token_id")
    if bos is None:
        bos = token_id(tok_cfg.get("bos_token"))
    tokenizer = {
        "type": "hf", "files": {"tokenizer_json": "tokenizer.json"}, "eos_token_ids": eos_ids,
        "bos_token_id": bos, "special_tokens": [a["content"] for a in tok.get("added_tokens", []) if a.get("special")],
    }
    files: dict[str, Path | bytes] = {"tokenizer.json": folder / "tokenizer.json"}
    if tok_cfg:
        tokenizer["files"]["tokenizer_config_json"] = "tokenizer_config.json"
        files["tokenizer_config.json"] = folder / "tokenizer_config.json"
    return tokenizer, files


def _chat_format_hint(folder: Path) -> str | None:
    template = ""
    if (folder / "tokenizer_config.json").is_file():
        template = str(_load_json(folder / "tokenizer_config.json").get("chat_template") or "")
    if (folder / "chat_template.jinja").is_file():
        template += (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return "chatml" if "<|im_start|>" in template else None


def read_for_import(path: Path) -> ImportedModel:
    """:func:`read` plus the folder's tokenizer files and a prompt-format hint, for the store."""
    config, state = read(path)
    folder = path if path.is_dir() else path.parent
    cfg = _load_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    tokenizer: dict[str, Any] = {"type": "none"}
    files: dict[str, Path | bytes] = {}
    if (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file():
        tokenizer, files = gpt2_tokenizer_entry(folder / "encoder.json", folder / "vocab.bpe")
    elif config["pos_emb"] == "learned" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # HF's vocab.json/merges.txt are OpenAI's encoder.json/vocab.bpe under other names
        tokenizer, files = gpt2_tokenizer_entry(folder / "vocab.json", folder / "merges.txt")
    elif (folder / "tokenizer.json").is_file():
        tokenizer, files = hf_tokenizer_entry(folder, cfg)
    return ImportedModel(config=config, state_dict=state, source={"format": "hf", "path": str(path)},
                         tokenizer=tokenizer, files=files, prompt_format=_chat_format_hint(folder))


def config_to_hf(config: Mapping[str, Any], tokenizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An HF config.json dict for our config (GPT2LMHeadModel or LlamaForCausalLM)."""
    tokenizer = tokenizer or {}
    eos = list(tokenizer.get("eos_token_ids") or [])
    if config["pos_emb"] == "learned":
        if config["norm"] != "layernorm" or config["mlp"] != "gelu" or config["n_kv_heads"] != config["n_heads"]:
            raise ValueError("cannot export: an HF GPT-2 needs LayerNorm, a GELU MLP and n_kv_heads == n_heads")
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config["vocab_size"],
            "n_positions": config["context_length"], "n_embd": config["d_model"], "n_layer": config["n_layers"],
            "n_head": config["n_heads"], "n_inner": config["ffn_dim"], "activation_function": "gelu_new",
            "layer_norm_epsilon": config["norm_eps"], "tie_word_embeddings": config["tie_embeddings"],
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "bos_token_id": eos[0] if eos else None, "eos_token_id": eos[0] if eos else None,
        }
    if config["norm"] != "rmsnorm" or config["mlp"] != "swiglu":
        raise ValueError("cannot export: an HF Llama needs RMSNorm and a SwiGLU MLP")
    if config["qkv_bias"] != config["bias"]:
        raise ValueError("cannot export: HF Llama's attention_bias covers q/k/v and o together, so qkv_bias must "
                         "equal bias")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config["rope_base"]}
    if config.get("rope_scaling"):
        rope = {"rope_type": "linear", "rope_theta": config["rope_base"], "factor": config["rope_scaling"]}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config["vocab_size"],
        "hidden_size": config["d_model"], "intermediate_size": config["ffn_dim"],
        "num_hidden_layers": config["n_layers"], "num_attention_heads": config["n_heads"],
        "num_key_value_heads": config["n_kv_heads"], "head_dim": config["d_model"] // config["n_heads"],
        "max_position_embeddings": config["context_length"], "rms_norm_eps": config["norm_eps"],
        "rope_parameters": rope, "rope_theta": config["rope_base"], "hidden_act": "silu",
        "attention_bias": config["qkv_bias"], "mlp_bias": config["bias"],
        "tie_word_embeddings": config["tie_embeddings"], "attention_dropout": 0.0,
        "bos_token_id": tokenizer.get("bos_token_id"), "eos_token_id": (eos[0] if len(eos) == 1 else eos) or None,
    }


def write(out: str | Path, manifest: Mapping[str, Any], state: Mapping[str, torch.Tensor],
          model_folder: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write an HF folder (atomically) that ``AutoModelForCausalLM.from_pretrained(out)`` loads.

    Args:
        out: the new folder.
        manifest: the store manifest (config, tokenizer, dtype).
        state: canonical state dict.
        model_folder: the store folder, whose tokenizer files are converted/copied when given.
    """
    from safetensors.torch import save_file

    config = manifest["config"]
    hf_config = config_to_hf(config, manifest.get("tokenizer"))
    if config["pos_emb"] == "learned":
        tensors = export_table(state, HF_GPT2, config, prefix="transformer.", fill_missing=True)
        if "transformer.lm_head.weight" in tensors:
            tensors["lm_head.weight"] = tensors.pop("transformer.lm_head.weight")
    else:
        tensors = export_table(state, HF_LLAMA, config)
    hf_config["dtype"] = manifest.get("dtype", "float32")
    out = Path(out).expanduser().resolve()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if model_folder is not None:
            _write_tokenizer(tmp, manifest, model_folder)
    return out


def _write_tokenizer(tmp: Path, manifest: Mapping[str, Any], model_folder: Path) -> None:
    tok = manifest.get("tokenizer") or {}
    files = tok.get("files") or {}
    if tok.get("type") == "gpt2-bpe":
        shutil.copyfile(model_folder / files["encoder_json"], tmp / "vocab.json")
        shutil.copyfile(model_folder / files["vocab_bpe"], tmp / "merges.txt")
        special = "<|endoftext|>"
        tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": manifest["config"]["context_length"],
                   "bos_token": special, "eos_token": special, "unk_token": special, "add_prefix_space": False}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    elif tok.get("type") == "hf":
        shutil.copyfile(model_folder / files["tokenizer_json"], tmp / "tokenizer.json")
        if files.get("tokenizer_config_json") and (model_folder / files["tokenizer_config_json"]).is_file():
            shutil.copyfile(model_folder / files["tokenizer_config_json"], tmp / "tokenizer_config.json")
        else:
            tok_json = _load_json(model_folder / files["tokenizer_json"])
            id_to_token = {a["id"]: a["content"] for a in tok_json.get("added_tokens", [])}
            eos = [id_to_token.get(i) for i in tok.get("eos_token_ids") or []]
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
                       "model_max_length": manifest["config"]["context_length"],
                       "eos_token": eos[0] if eos and eos[0] else None,
                       "bos_token": id_to_token.get(tok.get("bos_token_id"))}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
