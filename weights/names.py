"""Our canonical tensor names, and the name tables to and from every format we read or write.

Tables are data, in the manner of gpt-fast's ``convert_hf_checkpoint.py`` weight map and litgpt's
``copy_weights_*``: a source-name template (``{layer}`` stands for the block index) maps to a :class:`Rule`, which
names the canonical tensor(s) and the transform to apply. The transforms are the few that the formats need:

- ``t``: HF GPT-2 / OpenAI Conv1D weights are stored (in, out); ``nn.Linear`` wants (out, in).
- ``split3``/``t_split3``: GPT-2's fused ``c_attn`` holds q, k and v side by side (LLMs-from-scratch ch05).
- ``unpermute_q``/``unpermute_k``: llama.cpp's ``convert_hf_to_gguf.py`` interleaves the two rotary halves of each
  q/k head's rows; we undo it (HF transformers ``modeling_gguf_pytorch_utils.py`` does the same).
- ``head``: the output head, dropped when the config ties it to the token embedding (stored once).

The canonical names are those of ``engine.model.GPT.state_dict()``. This module speaks plain
data (a config dict with ModelConfig's field names), so it imports nothing from ``engine``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

QKV = ("blocks.{layer}.attn.q_proj", "blocks.{layer}.attn.k_proj", "blocks.{layer}.attn.v_proj")


@dataclass(frozen=True)
class Rule:
    """Where one source tensor goes: ``target`` is a canonical template (a 3-tuple for a fused q/k/v tensor, None to
    drop it) and ``op`` the transform (copy, t, split3, t_split3, unpermute_q, unpermute_k, head, drop)."""

    target: str | tuple[str, str, str] | None
    op: str = "copy"


def _qkv(suffix: str, op: str) -> Rule:
    return Rule(tuple(f"{p}.{suffix}" for p in QKV), op)  # type: ignore[arg-type]


HF_GPT2: dict[str, Rule] = {
    "wte.weight": Rule("tok_emb.weight"),
    "wpe.weight": Rule("pos_emb.weight"),
    "h.{layer}.ln_1.weight": Rule("blocks.{layer}.attn_norm.weight"),
    "h.{layer}.ln_1.bias": Rule("blocks.{layer}.attn_norm.bias"),
    "h.{layer}.attn.c_attn.weight": _qkv("weight", "t_split3"),
    "h.{layer}.attn.c_attn.bias": _qkv("bias", "split3"),
    "h.{layer}.attn.c_proj.weight": Rule("blocks.{layer}.attn.o_proj.weight", "t"),
    "h.{layer}.attn.c_proj.bias": Rule("blocks.{layer}.attn.o_proj.bias"),
    "h.{layer}.ln_2.weight": Rule("blocks.{layer}.mlp_norm.weight"),
    "h.{layer}.ln_2.bias": Rule("blocks.{layer}.mlp_norm.bias"),
    "h.{layer}.mlp.c_fc.weight": Rule("blocks.{layer}.mlp.up_proj.weight", "t"),
    "h.{layer}.mlp.c_fc.bias": Rule("blocks.{layer}.mlp.up_proj.bias"),
    "h.{layer}.mlp.c_proj.weight": Rule("blocks.{layer}.mlp.down_proj.weight", "t"),
    "h.{layer}.mlp.c_proj.bias": Rule("blocks.{layer}.mlp.down_proj.bias"),
    "ln_f.weight": Rule("norm_f.weight"),
    "ln_f.bias": Rule("norm_f.bias"),
    "lm_head.weight": Rule("lm_head.weight", "head"),
    # causal-mask buffers that old transformers versions saved with the weights
    "h.{layer}.attn.bias": Rule(None, "drop"),
    "h.{layer}.attn.masked_bias": Rule(None, "drop"),
}
"""HF ``GPT2LMHeadModel`` names after stripping the optional ``transformer.`` prefix (hub files for ``gpt2`` have
none, ``save_pretrained`` writes it)."""

HF_LLAMA: dict[str, Rule] = {
    "model.embed_tokens.weight": Rule("tok_emb.weight"),
    "model.layers.{layer}.input_layernorm.weight": Rule("blocks.{layer}.attn_norm.weight"),
    **{f"model.layers.{{layer}}.self_attn.{p}_proj.{w}": Rule(f"blocks.{{layer}}.attn.{p}_proj.{w}")
       for p in "qkvo" for w in ("weight", "bias")},
    "model.layers.{layer}.post_attention_layernorm.weight": Rule("blocks.{layer}.mlp_norm.weight"),
    **{f"model.layers.{{layer}}.mlp.{p}_proj.{w}": Rule(f"blocks.{{layer}}.mlp.{p}_proj.{w}")
       for p in ("gate", "up", "down") for w in ("weight", "bias")},
    "model.norm.weight": Rule("norm_f.weight"),
    "lm_head.weight": Rule("lm_head.weight", "head"),
    "model.layers.{layer}.self_attn.rotary_emb.inv_freq": Rule(None, "drop"),
}
"""HF ``LlamaForCausalLM`` names."""

OPENAI_TF: dict[str, Rule] = {
    "model/wte": Rule("tok_emb.weight"),
    "model/wpe": Rule("pos_emb.weight"),
    "model/h{layer}/ln_1/g": Rule("blocks.{layer}.attn_norm.weight"),
    "model/h{layer}/ln_1/b": Rule("blocks.{layer}.attn_norm.bias"),
    "model/h{layer}/attn/c_attn/w": _qkv("weight", "t_split3"),
    "model/h{layer}/attn/c_attn/b": _qkv("bias", "split3"),
    "model/h{layer}/attn/c_proj/w": Rule("blocks.{layer}.attn.o_proj.weight", "t"),
    "model/h{layer}/attn/c_proj/b": Rule("blocks.{layer}.attn.o_proj.bias"),
    "model/h{layer}/ln_2/g": Rule("blocks.{layer}.mlp_norm.weight"),
    "model/h{layer}/ln_2/b": Rule("blocks.{layer}.mlp_norm.bias"),
    "model/h{layer}/mlp/c_fc/w": Rule("blocks.{layer}.mlp.up_proj.weight", "t"),
    "model/h{layer}/mlp/c_fc/b": Rule("blocks.{layer}.mlp.up_proj.bias"),
    "model/h{layer}/mlp/c_proj/w": Rule("blocks.{layer}.mlp.down_proj.weight", "t"),
    "model/h{layer}/mlp/c_proj/b": Rule("blocks.{layer}.mlp.down_proj.bias"),
    "model/ln_f/g": Rule("norm_f.weight"),
    "model/ln_f/b": Rule("norm_f.bias"),
}
"""OpenAI's GPT-2 TF checkpoint variables (leading singleton dims squeezed by the reader; ``wte`` is also the
head)."""

GGUF_LLAMA: dict[str, Rule] = {
    "token_embd.weight": Rule("tok_emb.weight"),
    "blk.{layer}.attn_norm.weight": Rule("blocks.{layer}.attn_norm.weight"),
    "blk.{layer}.attn_q.weight": Rule("blocks.{layer}.attn.q_proj.weight", "unpermute_q"),
    "blk.{layer}.attn_k.weight": Rule("blocks.{layer}.attn.k_proj.weight", "unpermute_k"),
    "blk.{layer}.attn_v.weight": Rule("blocks.{layer}.attn.v_proj.weight"),
    "blk.{layer}.attn_output.weight": Rule("blocks.{layer}.attn.o_proj.weight"),
    "blk.{layer}.ffn_norm.weight": Rule("blocks.{layer}.mlp_norm.weight"),
    "blk.{layer}.ffn_gate.weight": Rule("blocks.{layer}.mlp.gate_proj.weight"),
    "blk.{layer}.ffn_up.weight": Rule("blocks.{layer}.mlp.up_proj.weight"),
    "blk.{layer}.ffn_down.weight": Rule("blocks.{layer}.mlp.down_proj.weight"),
    "output_norm.weight": Rule("norm_f.weight"),
    "output.weight": Rule("lm_head.weight", "head"),
}
"""llama.cpp names for ``general.architecture == "llama"`` (GGUF stores Linear weights (out, in), like torch)."""

GGUF_GPT2: dict[str, Rule] = {
    "token_embd.weight": Rule("tok_emb.weight"),
    "position_embd.weight": Rule("pos_emb.weight"),
    "blk.{layer}.attn_norm.weight": Rule("blocks.{layer}.attn_norm.weight"),
    "blk.{layer}.attn_norm.bias": Rule("blocks.{layer}.attn_norm.bias"),
    "blk.{layer}.attn_qkv.weight": _qkv("weight", "split3"),
    "blk.{layer}.attn_qkv.bias": _qkv("bias", "split3"),
    "blk.{layer}.attn_output.weight": Rule("blocks.{layer}.attn.o_proj.weight"),
    "blk.{layer}.attn_output.bias": Rule("blocks.{layer}.attn.o_proj.bias"),
    "blk.{layer}.ffn_norm.weight": Rule("blocks.{layer}.mlp_norm.weight"),
    "blk.{layer}.ffn_norm.bias": Rule("blocks.{layer}.mlp_norm.bias"),
    "blk.{layer}.ffn_up.weight": Rule("blocks.{layer}.mlp.up_proj.weight"),
    "blk.{layer}.ffn_up.bias": Rule("blocks.{layer}.mlp.up_proj.bias"),
    "blk.{layer}.ffn_down.weight": Rule("blocks.{layer}.mlp.down_proj.weight"),
    "blk.{layer}.ffn_down.bias": Rule("blocks.{layer}.mlp.down_proj.bias"),
    "output_norm.weight": Rule("norm_f.weight"),
    "output_norm.bias": Rule("norm_f.bias"),
    "output.weight": Rule("lm_head.weight", "head"),
}
"""llama.cpp names for ``general.architecture == "gpt2"`` (the converter already transposed Conv1D)."""


def expected_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for a config dict (ModelConfig field names); exactly ``GPT(config).state_dict()``."""
    d, f, n_layers, vocab = config["d_model"], config["ffn_dim"], config["n_layers"], config["vocab_size"]
    kv = config["n_kv_heads"] * (d // config["n_heads"])
    bias, qkv_bias = config.get("bias", True), config.get("qkv_bias", True)
    norm_bias = config.get("norm", "layernorm") == "layernorm" and bias
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (vocab, d)}
    if config.get("pos_emb", "learned") == "learned":
        shapes["pos_emb.weight"] = (config["context_length"], d)

    def norm(prefix: str) -> None:
        shapes[f"{prefix}.weight"] = (d,)
        if norm_bias:
            shapes[f"{prefix}.bias"] = (d,)

    def linear(prefix: str, out: int, inp: int, has_bias: bool) -> None:
        shapes[f"{prefix}.weight"] = (out, inp)
        if has_bias:
            shapes[f"{prefix}.bias"] = (out,)

    for i in range(n_layers):
        p = f"blocks.{i}"
        norm(f"{p}.attn_norm")
        linear(f"{p}.attn.q_proj", d, d, qkv_bias)
        linear(f"{p}.attn.k_proj", kv, d, qkv_bias)
        linear(f"{p}.attn.v_proj", kv, d, qkv_bias)
        linear(f"{p}.attn.o_proj", d, d, bias)
        norm(f"{p}.mlp_norm")
        if config.get("mlp", "gelu") == "swiglu":
            linear(f"{p}.mlp.gate_proj", f, d, bias)
        linear(f"{p}.mlp.up_proj", f, d, bias)
        linear(f"{p}.mlp.down_proj", d, f, bias)
    norm("norm_f")
    if not config.get("tie_embeddings", True):
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def _compile(table: Mapping[str, Rule]) -> tuple[dict[str, Rule], list[tuple[re.Pattern, str, Rule]]]:
    exact = {k: r for k, r in table.items() if "{layer}" not in k}
    layered = [(re.compile(re.escape(k).replace(r"\{layer\}", r"(\d+)") + "$"), k, r)
               for k, r in table.items() if "{layer}" in k]
    return exact, layered


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores each head's rows as (hd/2, 2) interleaved pairs; HF/our RoPE wants (2, hd/2) halves.
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _split3(w: torch.Tensor, config: Mapping, source: str, name: str) -> tuple[torch.Tensor, ...]:
    d = config["d_model"]
    kv = config["n_kv_heads"] * (d // config["n_heads"])
    if w.shape[0] != d + 2 * kv:
        raise ValueError(f"{source}: tensor {name} has shape {tuple(w.shape)} but the config expects a fused q/k/v "
                         f"of {d + 2 * kv} rows; check that the config belongs to these weights")
    return tuple(w.split([d, kv, kv], dim=0))


def apply_table(tensors: Mapping[str, torch.Tensor], table: Mapping[str, Rule], config: Mapping, source: str,
                *, strip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename and transform source tensors into our canonical state dict, then check it against the config.

    Args:
        tensors: source name -> tensor (any float dtype; it is kept).
        table: one of this module's tables.
        config: config dict with ModelConfig's field names.
        source: the file or folder the tensors came from, for error messages.
        strip_prefixes: prefixes removed from source names before lookup (e.g. ``"transformer."``).

    Raises:
        ValueError: on unexpected or missing tensors, or a shape that does not fit the config.
    """
    exact, layered = _compile(table)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for name, w in tensors.items():
        key = name
        for prefix in strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        rule, layer = exact.get(key), None
        if rule is None:
            for pattern, _, r in layered:
                m = pattern.match(key)
                if m:
                    rule, layer = r, m.group(1)
                    break
        if rule is None:
            unexpected.append(name)
            continue
        if rule.op == "drop" or (rule.op == "head" and config.get("tie_embeddings", True)):
            continue
        targets = rule.target if isinstance(rule.target, tuple) else (rule.target,)
        targets = tuple(t.replace("{layer}", layer or "") for t in targets)
        if rule.op in ("t", "t_split3"):
            if w.dim() != 2:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(w.shape)}, expected a 2-D weight")
            w = w.t()
        if rule.op in ("split3", "t_split3"):
            parts = _split3(w, config, source, name)
        elif rule.op == "unpermute_q":
            parts = (_unpermute(w, config["n_heads"]),)
        elif rule.op == "unpermute_k":
            parts = (_unpermute(w, config["n_kv_heads"]),)
        else:
            parts = (w,)
        for target, part in zip(targets, parts):
            if target in out:
                raise ValueError(f"{source}: tensors {origin[target]} and {name} both map to {target}; "
                                 f"the file holds duplicate weights")
            out[target] = part.contiguous()
            origin[target] = name
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]}{more}; the file is not a checkpoint in the "
                         f"layout its config names")
    check_state_dict(out, config, source, origin=origin)
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], config: Mapping, source: str,
                     *, origin: Mapping[str, str] | None = None) -> None:
    """Raise ValueError naming the file, the tensor and both shapes if ``state`` does not fit ``config``."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {missing[:5]}{more}; the file is incomplete or does not "
                         f"match its config")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{source}: unexpected tensors {extra[:5]} for this config; the file does not match it")
    for k, shape in expected.items():
        actual = tuple(state[k].shape)
        if actual != shape:
            src = f" (from {origin[k]})" if origin and k in origin and origin[k] != k else ""
            raise ValueError(f"{source}: tensor {k}{src} has shape {actual} but the config expects {shape}; "
                             f"check that the config belongs to these weights")


def export_table(state: Mapping[str, torch.Tensor], table: Mapping[str, Rule], config: Mapping,
                 *, prefix: str = "", fill_missing: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of :func:`apply_table` for the copy/t/split3/t_split3/head ops (HF GPT-2 and Llama).

    Args:
        fill_missing: write zeros for tensors the target format always has but our config lacks (HF GPT-2 always
            has q/k/v and LayerNorm biases; the book's from-scratch 124M has no qkv bias).
    """
    expected = expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    layers = [str(i) for i in range(config["n_layers"])]
    for src, rule in table.items():
        if rule.op == "drop" or (rule.op == "head" and config.get("tie_embeddings", True)):
            continue
        if rule.op not in ("copy", "t", "split3", "t_split3", "head"):
            raise ValueError(f"export does not support the {rule.op!r} transform")
        for layer in (layers if "{layer}" in src else [""]):
            targets = rule.target if isinstance(rule.target, tuple) else (rule.target,)
            targets = tuple(t.replace("{layer}", layer) for t in targets)
            parts = []
            for t in targets:
                if t in state:
                    parts.append(state[t])
                elif fill_missing and _fillable_shape(t, config) is not None:
                    parts.append(torch.zeros(_fillable_shape(t, config), dtype=state["tok_emb.weight"].dtype))
                else:
                    parts = []
                    break
            if not parts:
                if any(t in expected for t in targets):
                    raise ValueError(f"cannot export: tensor {targets[0]} is missing")
                continue
            w = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if rule.op in ("t", "t_split3"):
                w = w.t()
            out[prefix + src.replace("{layer}", layer)] = w.contiguous()
    return out


def _fillable_shape(name: str, config: Mapping) -> tuple[int, ...] | None:
    """Shape of a bias/shift our config omits but the target format has; None for anything else."""
    if not name.endswith(".bias"):
        return None
    full = expected_shapes({**config, "bias": True, "qkv_bias": True, "norm": "layernorm"})
    return full.get(name)
