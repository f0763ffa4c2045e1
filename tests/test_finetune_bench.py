"""The training-speed pieces: fused AdamW equals torch's reference loop, the allocator setting, and the bench's
report (medians over rounds, ratios within a round) and memory probe."""

from __future__ import annotations

import platform

import pytest
import torch

from finetune import allocator, bench
from finetune.args import TrainArgs
from finetune.train import build_optimizer


def test_fused_adamw_matches_the_reference_loop():
    torch.manual_seed(123)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    args = TrainArgs(lr=1e-2, weight_decay=0.1)
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = build_optimizer(ours, args, torch.device("cpu"))
    ref_opt = torch.optim.AdamW(ref, lr=args.lr, weight_decay=args.weight_decay, foreach=False)
    assert opt.param_groups[0]["fused"] is True
    for _ in range(3):
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_applies_once_and_releases():
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # idempotent
    x = torch.ones(8 * 2**20)  # 32 MiB: above glibc's largest mmap threshold, now served from the heap
    del x
    allocator.release_freed_memory()
    assert torch.ones(4).sum().item() == 4.0


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc only")
def test_peak_rss_is_this_process_and_resets():
    before = bench._peak_rss_mib()
    assert before > 0
    assert bench._reset_peak_rss() == pytest.approx(before, abs=1.0)
    assert bench._peak_rss_mib() <= before + 1.0


def _case(tps: float, mem: float) -> dict[str, float]:
    return {"tokens": 100, "seconds": 100 / tps, "tokens_per_s": tps, "train_peak_rss_mib": mem,
            "peak_rss_mib": mem + 100}


def test_report_gives_medians_and_ratios_within_rounds():
    results = {
        "ours-lora": [_case(300, 2000), _case(100, 2000), _case(240, 2100)],
        "ours-full": [_case(200, 3000), _case(80, 3000), _case(200, 3000)],
        "hf-lora": [_case(250, 1900), _case(100, 1900), _case(240, 1900)],
    }
    text = bench.report(results, bench.BenchArgs(rounds=3))
    # a slow second round drags every case alike: the ratios come from within each round
    row = next(line for line in text.splitlines() if line.startswith("ours-lora "))
    assert row.split()[1:4] == ["240.0", "(100.0-300.0)", "2000"]
    assert "LoRA, ours vs HF Trainer + peft: 1.00 (1.00-1.20)x" in text
    assert "ours, LoRA vs full SFT: 1.25 (1.20-1.50)x tokens/s" in text
    assert "training peak memory 0.67 (0.67-0.70)x" in text
    assert "3 round(s)" in text and "--same-allocator" in text


def test_bench_refuses_unknown_cases_and_zero_rounds():
    with pytest.raises(ValueError, match="unknown --cases"):
        bench.run(bench.BenchArgs(cases="ours-lora,theirs"))
    with pytest.raises(ValueError, match="--rounds"):
        bench.run(bench.BenchArgs(rounds=0))
