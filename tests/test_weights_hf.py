"""HF safetensors import/export against transformers as the oracle.

Random-weight ``GPT2LMHeadModel`` (a tiny config and the real 124M config) and ``LlamaForCausalLM`` (GQA, RoPE theta
100000, tied and untied, sharded) are saved with ``save_pretrained``, imported with our CLI, loaded into
``engine.model.GPT`` with ``strict=True``, and must give the same logits (<= 1e-4 in fp32) and the same greedy
continuation. Export goes the other way and transformers must load it back to the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.config import ModelConfig  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.model import GPT  # noqa: E402
from weights import store  # noqa: E402
from weights.__main__ import main  # noqa: E402

ATOL = 1e-4


def _randomize(model: torch.nn.Module, std: float = 0.1) -> None:
    """Non-trivial values everywhere (biases and norm scales too), so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if ("ln_" in name or "norm" in name) and name.endswith("weight") else noise)


def _ours(root: Path, name: str) -> GPT:
    manifest, state = store.read(name, root)
    model = GPT(ModelConfig.from_dict(manifest["config"]))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _greedy(model: GPT, idx: torch.Tensor, n: int) -> list[int]:
    """Argmax decoding of one row with our KV cache (prefill once, then one token per step)."""
    cache = KVCache.build(model.config, 1, idx.shape[1] + n)
    logits, out = model(idx, cache=cache, last_only=True), []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([out[-1:]]), cache=cache)
    return out


def _hf_greedy(model, idx: torch.Tensor, n: int) -> list[int]:
    """The same with transformers' own cache."""
    res, out = model(idx, use_cache=True), []
    for _ in range(n):
        out.append(int(res.logits[0, -1].argmax()))
        res = model(torch.tensor([out[-1:]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def _compare(hf_model, ours: GPT, vocab: int, n_new: int = 30, seq: int = 12) -> None:
    idx = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx).logits
        got = ours(idx)
        assert (got - ref).abs().max().item() <= ATOL
        hf_tokens = _hf_greedy(hf_model, idx[:1], n_new)
        our_tokens = _greedy(ours, idx[:1], n_new)
    assert our_tokens == hf_tokens


def _import(path: Path, name: str, root: Path, *extra: str) -> None:
    assert main(["--models-dir", str(root), "import", str(path), "--name", name, *extra]) == 0


def _tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                                  embd_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(model)
    return model


def _tiny_llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    _randomize(model)
    return model


def test_tiny_gpt2_matches_transformers_and_exports(tmp_path: Path) -> None:
    hf_model = _tiny_gpt2()
    hf_model.save_pretrained(tmp_path / "hf")
    root = tmp_path / "models"
    _import(tmp_path / "hf", "tiny-gpt2", root)
    manifest = store.read_manifest("tiny-gpt2", root)
    assert manifest["family"] == "gpt2" and manifest["config"]["d_model"] == 32
    assert manifest["config"]["qkv_bias"] is True and manifest["prompt_format"] == "none"
    ours = _ours(root, "tiny-gpt2")
    assert "lm_head.weight" not in ours.state_dict()  # tied head stored once
    _compare(hf_model, ours, 257)

    assert main(["--models-dir", str(root), "export", "tiny-gpt2", "--to", "hf", "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    idx = torch.arange(20)[None] % 257
    with torch.no_grad():
        assert (back(idx).logits - hf_model(idx).logits).abs().max().item() <= ATOL


def test_gpt2_124m_config_with_tokenizer(tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    cfg = transformers.GPT2Config(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)  # the real 124M shape
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(cfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    root = tmp_path / "models"
    _import(tmp_path / "hf", "gpt2-random", root, "--tokenizer-dir", str(gpt2_tokenizer_dir), "--prompt-format",
            "alpaca")
    manifest = store.read_manifest("gpt2-random", root)
    assert manifest["config"] == ModelConfig.from_name("gpt2-small").to_dict()
    assert manifest["num_parameters"] == 124_439_808  # OpenAI's 124M with qkv bias, head tied (counted once)
    assert manifest["tokenizer"]["type"] == "gpt2-bpe" and manifest["tokenizer"]["eos_token_ids"] == [50256]
    assert (store.model_dir("gpt2-random", root) / "encoder.json").read_bytes() == \
        (gpt2_tokenizer_dir / "encoder.json").read_bytes()
    _compare(hf_model, _ours(root, "gpt2-random"), 50257, seq=8)

    # export carries the tokenizer: transformers reads our encoder.json/vocab.bpe as vocab.json/merges.txt
    assert main(["--models-dir", str(root), "export", "gpt2-random", "--out", str(tmp_path / "out")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.encode("Akwirw ier") == [33901, 86, 343, 86, 220, 959]


@pytest.mark.parametrize("tie,shard", [(True, True), (False, False)])
def test_llama_matches_transformers_and_exports(tmp_path: Path, tie: bool, shard: bool) -> None:
    hf_model = _tiny_llama(tie)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if shard else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == shard
    root = tmp_path / "models"
    _import(tmp_path / "hf", "tiny-llama", root)
    manifest = store.read_manifest("tiny-llama", root)
    c = manifest["config"]
    assert (manifest["family"], c["n_kv_heads"], c["rope_base"], c["tie_embeddings"]) == ("llama", 2, 1e5, tie)
    ours = _ours(root, "tiny-llama")
    _compare(hf_model, ours, 257)

    out = tmp_path / "out"
    assert main(["--models-dir", str(root), "export", "tiny-llama", "--to", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    idx = torch.arange(40)[None] % 257
    with torch.no_grad():
        assert (back(idx).logits - hf_model(idx).logits).abs().max().item() <= ATOL


def test_bare_safetensors_file_needs_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf_model = _tiny_gpt2()
    hf_model.save_pretrained(tmp_path / "hf")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(lonely / "model.safetensors")
    root = tmp_path / "models"
    capsys.readouterr()  # drop transformers' progress bars
    assert main(["--models-dir", str(root), "import", str(lonely / "model.safetensors"), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and str(lonely / "model.safetensors") in err
    assert store.list_models(root) == []
