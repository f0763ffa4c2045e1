"""GGUF import against transformers as the oracle.

The real SmolLM2-135M-Instruct Q4_1 GGUF is imported (``smollm2_store``) and compared with transformers' own GGUF
loader on the same file: logits, greedy continuation and the tokenizer on a mixed string; then one chat turn must
know the capital of France. Synthetic tiny Llama GGUFs written with ``gguf.GGUFWriter`` (F32, F16, Q8_0, with
llama.cpp's q/k row permutation applied by hand here) must reproduce a transformers ``LlamaForCausalLM`` holding the
same (de)quantized weights, and a file with a K-quant must be refused without touching the store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tokenizers import Tokenizer  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.model import GPT  # noqa: E402
from weights import store  # noqa: E402
from weights.__main__ import main  # noqa: E402
from weights.fetch import SMOLLM2_NAME, SMOLLM2_SYSTEM_PROMPT  # noqa: E402

MIXED = ("Hello, world! The year 2024 had 366 days.\n"
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345\n"
         "Emoji: 😀🎉👍🏽, 中文：你好，世界！  3.14159\t<|im_start|>user done")


def _ours(root: Path, name: str) -> GPT:
    manifest, state = store.read(name, root)
    model = GPT(ModelConfig.from_dict(manifest["config"]))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _greedy(model: GPT, idx: torch.Tensor, n: int, stop: int | None = None) -> list[int]:
    """Argmax decoding of one row with our KV cache (prefill once, then one token per step)."""
    cache = KVCache.build(model.config, 1, idx.shape[1] + n)
    logits, out = model(idx, cache=cache, last_only=True), []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        if nxt == stop:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    return out


def _hf_greedy(model, idx: torch.Tensor, n: int) -> list[int]:
    """The same with transformers' own cache."""
    res, out = model(idx, use_cache=True), []
    for _ in range(n):
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
        res = model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32, attn_implementation="eager").eval()


def _chat_ids(tok: Tokenizer, question: str) -> list[int]:
    text = (f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    return tok.encode(text, add_special_tokens=False).ids


def test_smollm2_manifest(smollm2_store: Path) -> None:
    manifest = store.read_manifest(SMOLLM2_NAME, smollm2_store)
    assert manifest["config"] == ModelConfig.from_name("smollm2-135m").to_dict()
    assert (manifest["family"], manifest["prompt_format"], manifest["dtype"]) == ("llama", "chatml", "float32")
    assert manifest["system_prompt"] == SMOLLM2_SYSTEM_PROMPT
    assert manifest["num_parameters"] == 134_515_008  # 135M with the tied head counted once
    assert manifest["tokenizer"]["eos_token_ids"][0] == 2  # <|im_end|>
    folder = store.model_dir(SMOLLM2_NAME, smollm2_store)
    assert manifest["sha256"] == store.sha256_file(folder / "model.safetensors")
    assert "<|im_start|>" in json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_smollm2_logits_and_greedy_match_transformers(smollm2_store: Path, hf_smollm2) -> None:
    tok = Tokenizer.from_file(str(store.model_dir(SMOLLM2_NAME, smollm2_store) / "tokenizer.json"))
    ours = _ours(smollm2_store, SMOLLM2_NAME)
    idx = torch.tensor([_chat_ids(tok, "Write one sentence about the sea.")])
    with torch.no_grad():
        ref = hf_smollm2(idx).logits
        got = ours(idx)
        # same dequantized weights on both sides: only float32 summation order differs
        diff = (got - ref).abs().max().item()
        assert diff <= 5e-4, diff  # measured ~1.2e-4 on logits of magnitude ~20
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        assert _greedy(ours, idx, 20) == _hf_greedy(hf_smollm2, idx, 20)


def test_smollm2_tokenizer_matches_transformers(smollm2_store: Path, smollm2_gguf: Path) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = Tokenizer.from_file(str(store.model_dir(SMOLLM2_NAME, smollm2_store) / "tokenizer.json"))
    ids = tok.encode(MIXED, add_special_tokens=False).ids
    assert ids == hf_tok.encode(MIXED, add_special_tokens=False)
    assert 1 in ids and len(ids) > 60  # <|im_start|> stayed whole; the text was not one blob
    assert tok.decode(ids, skip_special_tokens=False) == MIXED
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]


def test_smollm2_knows_paris(smollm2_store: Path) -> None:
    tok = Tokenizer.from_file(str(store.model_dir(SMOLLM2_NAME, smollm2_store) / "tokenizer.json"))
    ours = _ours(smollm2_store, SMOLLM2_NAME)
    idx = torch.tensor([_chat_ids(tok, "What is the capital of France?")])
    with torch.no_grad():
        answer = tok.decode(_greedy(ours, idx, 24, stop=2))
    assert "Paris" in answer, answer


# --- synthetic GGUFs ----------------------------------------------------------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (written out here independently of weights.names)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def _write_llama_gguf(path: Path, model, qtype: str, extra_tensor: tuple | None = None) -> None:
    """Write ``model`` as llama.cpp would, and round ``model``'s 2-D weights to the values the file holds."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    state = model.state_dict()
    with torch.no_grad():
        for hf_name, t in state.items():
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if hf_name in names:
                gg = names[hf_name]
            else:
                layer, rest = hf_name.split(".")[2], ".".join(hf_name.split(".")[3:-1])
                gg = f"blk.{layer}.{per_layer[rest]}.weight"
            a = t.numpy().astype(np.float32)
            if gg.endswith("attn_q.weight"):
                a = _llama_cpp_permute(a, cfg.num_attention_heads)
            elif gg.endswith("attn_k.weight"):
                a = _llama_cpp_permute(a, cfg.num_key_value_heads)
            if a.ndim == 1 or qtype == "F32":
                w.add_tensor(gg, a)
                continue
            if qtype == "F16":
                stored, back = a.astype(np.float16), a.astype(np.float16).astype(np.float32)
                w.add_tensor(gg, stored)
            else:
                q = gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])
                w.add_tensor(gg, q, raw_dtype=gguf.GGMLQuantizationType[qtype])
                back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]).reshape(a.shape)
            if gg.endswith("attn_q.weight") or gg.endswith("attn_k.weight"):  # the oracle keeps HF's row order
                heads = cfg.num_attention_heads if "attn_q" in gg else cfg.num_key_value_heads
                back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
            t.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype,tie", [("F32", False), ("F16", True), ("Q8_0", True)])
def test_synthetic_llama_gguf_roundtrip(tmp_path: Path, qtype: str, tie: bool) -> None:
    hf_model = _tiny_hf_llama(tie)
    _write_llama_gguf(tmp_path / "tiny.gguf", hf_model, qtype)  # hf_model now holds the file's exact values
    root = tmp_path / "models"
    assert main(["--models-dir", str(root), "import", str(tmp_path / "tiny.gguf"), "--name", "tiny"]) == 0
    manifest = store.read_manifest("tiny", root)
    assert manifest["config"]["tie_embeddings"] is tie and manifest["config"]["n_kv_heads"] == 2
    assert manifest["config"]["rope_base"] == 100000.0
    ours = _ours(root, "tiny")
    idx = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4


def test_unsupported_quant_type_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf_model = _tiny_hf_llama(True)
    q2k = np.zeros((2, 84), dtype=np.uint8)  # two rows of one 256-value Q2_K block (84 bytes each)
    path = tmp_path / "bad.gguf"
    _write_llama_gguf(path, hf_model, "F32", extra_tensor=("blk.0.extra.weight", q2k, gguf.GGMLQuantizationType.Q2_K))
    root = tmp_path / "models"
    root.mkdir()
    assert main(["--models-dir", str(root), "import", str(path), "--name", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unsupported GGUF quantization Q2_K in tensor blk.0.extra.weight" in err and str(path) in err
    assert "Q4_1" in err  # the supported list
    assert list(root.iterdir()) == []


def test_smollm2_export_loads_in_transformers(smollm2_store: Path, hf_smollm2, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["--models-dir", str(smollm2_store), "export", SMOLLM2_NAME, "--to", "hf", "--out", str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(MIXED, add_special_tokens=False)
    assert ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode(MIXED, add_special_tokens=False).ids
    assert tok.eos_token == "<|im_end|>"
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    idx = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert (back(idx).logits - hf_smollm2(idx).logits).abs().max().item() <= 5e-4


def test_synthetic_gpt2_gguf(tmp_path: Path) -> None:
    """llama.cpp's GPT-2 layout: Conv1D weights already transposed, fused attn_qkv, the tied head written twice."""
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                                  embd_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if ".ln_" in name and name.endswith("weight") else 0.0))
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(2)
    w.add_context_length(32)
    w.add_embedding_length(32)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", sd["wte.weight"])
    w.add_tensor("position_embd.weight", sd["wpe.weight"])
    w.add_tensor("output.weight", sd["wte.weight"].copy())
    w.add_tensor("output_norm.weight", sd["ln_f.weight"])
    w.add_tensor("output_norm.bias", sd["ln_f.bias"])
    gg = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(2):
        for hf_name, name in gg.items():
            weight = sd[f"h.{i}.{hf_name}.weight"]
            w.add_tensor(f"blk.{i}.{name}.weight", weight if weight.ndim == 1 else weight.T.copy())
            w.add_tensor(f"blk.{i}.{name}.bias", sd[f"h.{i}.{hf_name}.bias"])
    w.add_vocab_size(96)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    root = tmp_path / "models"
    assert main(["--models-dir", str(root), "import", str(tmp_path / "g.gguf"), "--name", "g"]) == 0
    manifest = store.read_manifest("g", root)
    assert manifest["family"] == "gpt2" and manifest["config"]["tie_embeddings"] is True
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (_ours(root, "g")(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4
