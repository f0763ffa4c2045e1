"""``python -m engine bench`` end to end on a tiny random GPT-2 (with the transformers peer, without llama.cpp): every
figure is measured and reported, and the Markdown table carries each row with its target."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine import bench
from engine.config import ModelConfig
from engine.model import GPT
from weights import store

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def test_bench_runs_every_figure_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=1536, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                      ffn_dim=256)
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    root = tmp_path / "models"
    store.add_model("tiny", cfg.to_dict(), GPT(cfg).state_dict(), tokenizer=tok, files=files,
                    prompt_format="alpaca", root=root)
    monkeypatch.setattr(bench, "_llama_cpp_row", lambda args, ours: {"skipped": "not in this test"})
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "tiny", "missing", "--models-dir", str(root), "--dtypes", "fp32",
                       "--new-tokens", "8", "--no-cache-tokens", "8", "--no-cache-all", "--repeats", "1",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["models"]["tiny"]
    assert res["models"]["missing"] == {"skipped": f"not in the store {root}"}
    assert row["fp32"]["ours_tok_s"] > 0 and 0 < row["fp32"]["roofline_fraction"]
    # the roofline side by side: the round's tokens/s against the bandwidth read next to that run (one round here)
    (bw,) = row["fp32"]["read_bandwidth_gb_s"]
    nbytes = row["fp32"]["weight_bytes_per_token"]
    assert row["fp32"]["roofline_fraction"] == pytest.approx(row["fp32"]["ours_tok_s"] / (bw * 1e9 / nbytes))
    assert row["fp32"]["ours_tok_s_rounds"] == [row["fp32"]["ours_tok_s"]]  # each round's figures, for the README
    assert row["fp32"]["roofline_fraction_rounds"] == [pytest.approx(row["fp32"]["roofline_fraction"])]
    assert row["fp32"]["hf_tok_s_rounds"] == [row["fp32"]["hf_tok_s"]]
    assert bw <= res["read_bandwidth_gb_s"]  # the run's best reading, for the harsher figure next to it
    assert row["fp32"]["roofline_fraction_vs_run_max"] <= row["fp32"]["roofline_fraction"] * (1 + 1e-9)
    # the transformers peer ran on the same weights, side by side (one round here: the ratio is that round's)
    assert row["fp32"]["hf_tok_s"] > 0 and "hf_error" not in row["fp32"]
    assert row["fp32"]["vs_hf"] == row["fp32"]["ours_tok_s"] / row["fp32"]["hf_tok_s"]
    assert set(row["fp32"]["decode_kernels"]) == {"qkv", "o_proj", "up_proj", "down_proj", "head"}
    assert row["fp32"]["weight_bytes_per_token"] >= 4 * sum(p.numel() for p in GPT(cfg).blocks.parameters())
    # the stream ceiling: the step's products (4 a block, the head) read one at a time, next to the same reading
    (ceiling,) = row["fp32"]["stream_ceiling_gb_s"]
    assert row["fp32"]["step_products"] == 4 * cfg.n_layers + 1
    assert row["fp32"]["stream_ceiling_fraction"] == pytest.approx(ceiling / bw)
    assert row["fp32"]["stream_ceiling_tok_s"] == pytest.approx(ceiling * 1e9 / nbytes)
    nc = row["no_cache"]["fp32"]
    assert nc["same_tokens"] is True and nc["cached_s"] > 0 and nc["speedup"] == nc["uncached_s"] / nc["cached_s"]
    sv = row["serving"]
    assert sv["history_tokens_turn10"] > 300 and sv["ttft_turn1_ms"] > 0 and sv["ttft_ratio"] > 0
    assert sv["cached_tokens_turn10"] > 300  # turn 10 prefilled only its new tokens
    assert sv["ttft_turns_dropped"] == 0  # turn 10 reuses its cache (within the context: no overflow re-prefill)
    assert sv["tok_s_8_sessions"] > 0 and sv["mixed_slowdown"] > 0 and sv["adapter_load_ms"] > 0
    text = capsys.readouterr().out
    assert res["cpu"] in text
    # the OpenMP workers while serving are reported, with a warning when another thread holds a team
    assert isinstance(sv["openmp_workers"], int)
    assert ("OpenMP workers in the process while serving" in text) == (sv["openmp_workers"] > res["threads"] - 1)
    for figure in ("vs transformers", "vs roofline", "read one at a time", "cache vs no cache", "TTFT turn 10",
                   "8 sessions vs 1", "3 adapters vs base", "switch a session's adapter", "load a rank-16 adapter",
                   "not in this test"):
        assert figure in text, figure


def test_step_pieces_are_the_products_in_step_order() -> None:
    """q/k/v together, o, gate/up together, down per block, then the (tied) head: every weight byte of the step but
    the norms', in the dtype stored, each rounded up to 128 bytes."""
    cfg = ModelConfig(vocab_size=1000, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=96, mlp="swiglu", norm="rmsnorm", pos_emb="rope", bias=False, qkv_bias=False,
                      tie_embeddings=True)
    model = GPT(cfg).to(torch.bfloat16)
    lm = SimpleNamespace(model=model)  # what both read of a LoadedModel
    d, kv, f = 64, 2 * 16, 96
    block = [2 * d * (d + 2 * kv), 2 * d * d, 2 * d * 2 * f, 2 * f * d]
    assert bench.step_pieces(lm) == block * 2 + [2 * 1000 * 64]
    norms = sum(m.weight.numel() * 2 for m in model.modules() if type(m).__name__ == "RMSNorm")
    assert sum(bench.step_pieces(lm)) + norms == bench.weight_bytes_per_token(lm)


def test_llama_cpp_row_sets_the_peer_against_its_own_roofline(tmp_path, monkeypatch) -> None:
    """The llama.cpp peer (a stand-in interpreter printing its JSON) gets a roofline of its own: the GGUF's tensor
    bytes over the bandwidth read around its runs, and a row in the table."""
    import gguf
    import numpy as np

    from weights import fetch

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((8, 64), dtype=np.float32))  # 2048 bytes
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 64), dtype=np.float16))  # 512 bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert bench.gguf_tensor_bytes(path) == 2048 + 512
    script = tmp_path / "fake-python"
    out = {"llama_cpp_version": "9.9.9", "decode_tok_s": [100.0], "prompt_tok_s": [300.0]}
    script.write_text(f"#!{sys.executable}\nprint({json.dumps(out)!r})\n")
    script.chmod(0o755)
    monkeypatch.setattr(fetch, "get_smollm2_gguf", lambda: path)
    readings = iter([4e9, 5e9])
    monkeypatch.setattr(bench, "read_bandwidth", lambda: next(readings))
    args = SimpleNamespace(threads=1, new_tokens=8, llama_python=str(script), repeats=1)
    row = bench._llama_cpp_row(args, 50.0)
    assert row["llama_cpp_weight_bytes_per_token"] == 2560
    assert row["llama_cpp_roofline_tok_s"] == pytest.approx(5e9 / 2560)  # the higher reading
    assert row["llama_cpp_roofline_fraction"] == pytest.approx(100.0 / (5e9 / 2560))
    assert row["ratio"] == 0.5
    text = bench.to_markdown({"cpu": "x", "threads": 1, "read_bandwidth_gb_s": 5.0, "new_tokens": 8, "models": {},
                              "llama_cpp": row})
    assert "| llama.cpp | its decode tok/s (Q4_1, 0.0 MB a token) vs its roofline | 100.0 |" in text
