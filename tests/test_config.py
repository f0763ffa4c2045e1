"""ModelConfig: presets (seed b1), the seed's parameter counts (exercises 4.1/4.2, ch. 7 LoRA run) computed both in
closed form and from meta-device models, serialisation and validation."""

from __future__ import annotations

import pytest

from engine.config import PRESETS, ModelConfig
from engine.model import build_model

GPT2_SIZES = {  # seed b1 model_configs: emb_dim, n_layers, n_heads
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}


def meta_params(config: ModelConfig) -> int:
    return sum(p.numel() for p in build_model(config, device="meta").parameters())


@pytest.mark.parametrize("name", list(GPT2_SIZES))
def test_gpt2_presets(name):
    cfg = PRESETS[name]
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == GPT2_SIZES[name]
    assert (cfg.context_length, cfg.vocab_size) == (1024, 50257)
    assert cfg.head_dim == 64 and cfg.n_kv_heads == cfg.n_heads and cfg.ffn_dim == 4 * cfg.d_model
    assert (cfg.norm, cfg.mlp, cfg.pos_emb, cfg.norm_eps) == ("layernorm", "gelu", "learned", 1e-5)
    assert cfg.tie_embeddings and cfg.bias and cfg.qkv_bias  # OpenAI's checkpoints carry q/k/v biases
    assert cfg.family == "gpt2"


def test_smollm2_preset():
    cfg = PRESETS["smollm2-135m"]
    assert (cfg.n_layers, cfg.d_model, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 1536, 9, 3)
    assert (cfg.rope_base, cfg.vocab_size, cfg.tie_embeddings) == (100000.0, 49152, True)
    assert (cfg.norm, cfg.mlp, cfg.pos_emb, cfg.bias, cfg.qkv_bias) == ("rmsnorm", "swiglu", "rope", False, False)
    assert cfg.head_dim == 64 and cfg.group_size == 3 and cfg.family == "llama"
    assert cfg.num_parameters() == meta_params(cfg) == 134_515_008  # HF's SmolLM2-135M count


def test_exercise_4_1_per_block_counts():
    model = build_model(ModelConfig.from_name("gpt2-small", qkv_bias=False), device="meta")
    block = model.blocks[0]
    assert sum(p.numel() for p in block.mlp.parameters()) == 4_722_432
    assert sum(p.numel() for p in block.attn.parameters()) == 2_360_064


def test_exercise_4_2_gpt2_xl_counts():
    cfg = ModelConfig.from_name("gpt2-xl", qkv_bias=False)
    total = cfg.num_parameters(count_tied_head=True)
    assert total == 1_637_792_000
    assert cfg.num_parameters() == meta_params(cfg) == 1_557_380_800  # tied head counted once
    assert total - cfg.vocab_size * cfg.d_model == 1_557_380_800
    assert round(total * 4 / 1024**2, 2) == 6247.68  # MB in fp32


def test_gpt2_medium_qkv_bias_count():
    cfg = ModelConfig.from_name("gpt2-medium")  # qkv_bias=True
    assert cfg.num_parameters(count_tied_head=True) == 406_286_336
    assert meta_params(cfg) + cfg.vocab_size * cfg.d_model == 406_286_336


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": False},
    {"bias": False, "qkv_bias": False},
    {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "n_kv_heads": 1, "bias": False},
    {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "n_kv_heads": 2, "bias": True, "tie_embeddings": False},
])
def test_closed_form_matches_module(overrides):
    cfg = ModelConfig(**{**dict(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                                ffn_dim=64), **overrides})
    assert cfg.num_parameters() == meta_params(cfg)


def test_dict_round_trip_and_from_name():
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_name("gpt2-small", qkv_bias=False).qkv_bias is False
    with pytest.raises(ValueError, match="known presets: gpt2-small, gpt2-medium"):
        ModelConfig.from_name("gpt2")  # exact names only, no fuzzy matching
    with pytest.raises(ValueError, match="unknown config keys \\['emb_dim'\\]"):
        ModelConfig.from_dict({**PRESETS["gpt2-small"].to_dict(), "emb_dim": 768})


@pytest.mark.parametrize("overrides, match", [
    ({"d_model": 30}, "d_model=30 is not divisible by n_heads=4"),
    ({"n_kv_heads": 3}, "n_heads=4 is not divisible by n_kv_heads=3"),
    ({"n_layers": 0}, "n_layers must be a positive int, got 0"),
    ({"norm": "batchnorm"}, "norm must be one of"),
    ({"mlp": "relu"}, "mlp must be one of"),
    ({"pos_emb": "alibi"}, "pos_emb must be one of"),
    ({"pos_emb": "rope", "d_model": 20, "n_heads": 4, "n_kv_heads": 4}, "RoPE needs an even head_dim, got 5"),
    ({"dropout": 1.0}, "dropout"),
])
def test_validation_errors(overrides, match):
    base = dict(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **overrides})


def test_frozen():
    with pytest.raises(Exception):
        PRESETS["gpt2-small"].n_layers = 1
