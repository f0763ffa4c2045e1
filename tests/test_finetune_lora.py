"""finetune.lora: a tiny LoRA run writes a standard PEFT adapter that peft and the engine load with equal logits."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.lora import BatchLora, load_adapter, merge_adapter
from engine.model import GPT
from finetune import lora
from finetune.runs import load_base
from weights import store

peft = pytest.importorskip("peft")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "instruction-data.json"
# Llama-style (RoPE, RMSNorm, SwiGLU, GQA) so that all seven projections exist, with the GPT-2 vocabulary.
TINY_LLAMA = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
TINY_GPT2 = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                        ffn_dim=64)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora_store")
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    for name, config in (("tiny-llama", TINY_LLAMA), ("tiny-gpt2", TINY_GPT2)):
        torch.manual_seed(123)
        store.add_model(name, config.to_dict(), GPT(config).state_dict(), tokenizer=tok, files=files,
                        prompt_format="alpaca", root=root)
    return root


def _args(root: Path, tmp_path: Path, **kw) -> lora.LoraArgs:
    base = dict(model="tiny-llama", data=str(DATA), format="alpaca", out="tiny-adapter", models_dir=str(root),
                limit=24, batch_size=4, epochs=1, lr=1e-2, rank=4, alpha=8.0, dropout=0.0, eval_every=0, eval_iter=1,
                sample_tokens=3, progress=False, run_dir=str(tmp_path / "run"))
    base.update(kw)
    return lora.LoraArgs(**base)


def _base_model(root: Path, name: str = "tiny-llama") -> GPT:
    return load_base(name, root).model.eval()


def test_only_lora_parameters_train(tiny_store, tmp_path):
    model = lora.apply_lora(_base_model(tiny_store), _args(tiny_store, tmp_path, rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(model.targeted_module_names) == 2 * 7
    # r * (in + out) per projection: q, o (32->32), k, v (32->16), gate, up (32->64), down (64->32)
    per_layer = 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 2 * per_layer
    gpt2 = lora.apply_lora(_base_model(tiny_store, "tiny-gpt2"), _args(tiny_store, tmp_path))
    assert sorted({n.rsplit(".", 1)[-1] for n in gpt2.targeted_module_names}) == \
        ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # no gate_proj in a GELU MLP
    with pytest.raises(ValueError, match="unknown --targets"):
        lora.apply_lora(_base_model(tiny_store), _args(tiny_store, tmp_path, targets="q_proj,W_query"))


def test_lora_adapter_loads_in_peft_and_engine(tiny_store, tmp_path):
    result, path = lora.run(_args(tiny_store, tmp_path))
    losses = result.history["train_loss"]
    assert result.steps == 5 and losses[-1] < losses[0]
    assert path == store.adapter_dir("tiny-llama", "tiny-adapter", tiny_store)
    assert {"adapter_config.json", "adapter_model.safetensors", "scratchchat.json", "loss.png",
            "metrics.json"} <= set(os.listdir(path))
    meta = json.loads((path / "scratchchat.json").read_text())
    base_manifest = store.read_manifest("tiny-llama", tiny_store)
    assert meta["base"] == "tiny-llama" and meta["base_sha256"] == base_manifest["sha256"]
    assert meta["prompt_format"] == "alpaca" and meta["rank"] == 4 and meta["alpha"] == 8.0
    assert meta["scaling"].startswith("peft: lora_alpha / r")
    assert meta["hyperparameters"]["lr"] == 1e-2
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] is None
    assert sorted(config["target_modules"]) == sorted(lora.ALL_TARGETS)
    assert [a["name"] for a in store.list_adapters("tiny-llama", tiny_store)] == ["tiny-adapter"]

    x = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():  # the same (inference) path as every comparison below
        base_logits = _base_model(tiny_store)(x)
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(_base_model(tiny_store), str(path)).eval()
        peft_logits = peft_model(x)
        assert not torch.allclose(peft_logits, base_logits, atol=1e-4)  # the adapter learned something
        # the engine applies the same folder per request through its LoRA hook
        engine_model = _base_model(tiny_store)
        adapter = load_adapter(path, TINY_LLAMA, base_name="tiny-llama", base_sha256=base_manifest["sha256"])
        engine_logits = engine_model(x, lora=BatchLora([adapter]))
        torch.testing.assert_close(engine_logits, peft_logits, rtol=1e-5, atol=1e-5)
        merged = merge_adapter(engine_model, adapter)
        torch.testing.assert_close(engine_model(x), peft_logits, rtol=1e-5, atol=1e-5)
        merged.unmerge()
        torch.testing.assert_close(engine_model(x), base_logits, rtol=0, atol=0)
        # peft's own merge equals the unmerged adapter
        merged_peft = peft_model.merge_and_unload()
        torch.testing.assert_close(merged_peft(x), peft_logits, rtol=1e-5, atol=1e-5)


def test_lora_resume_with_dropout_matches_uninterrupted(tiny_store, tmp_path):
    """Dropout on the LoRA branch draws from the RNG: equal losses prove the RNG state is restored too."""
    kw = dict(dropout=0.1, epochs=2, eval_every=4)
    full, _ = lora.run(_args(tiny_store, tmp_path / "a", out="full", **kw))

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    args = _args(tiny_store, tmp_path / "b", out="resumed", **kw)
    part, path = lora.run(args, on_step=interrupt)
    assert part.interrupted and part.steps == 3 and path is None
    args.resume = True
    resumed, path = lora.run(args)
    assert resumed.steps == full.steps == 10
    assert resumed.history["train_loss"] == full.history["train_loss"]
    from safetensors.torch import load_file

    a = load_file(str(store.adapter_dir("tiny-llama", "full", tiny_store) / "adapter_model.safetensors"))
    b = load_file(str(path / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        lora.run(_args(tiny_store, tmp_path / "c", out="full", **kw))
