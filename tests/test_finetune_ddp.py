"""DDP: ``torchrun --nproc_per_node 2`` (gloo, CPU) gives the losses of one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model import GPT
from finetune import sft
from weights import store

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "instruction-data.json"
TINY = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_store")
    torch.manual_seed(123)
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    store.add_model("tiny", TINY.to_dict(), GPT(TINY).state_dict(), tokenizer=tok, files=files,
                    prompt_format="alpaca", root=root)
    return root


COMMON = dict(model="tiny", data=str(DATA), format="alpaca", limit=40, batch_size=4, epochs=1, max_steps=5, lr=2e-3,
              eval_every=2, eval_iter=2, sample_tokens=3, mask_instructions=True)


def _cli(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tiny_store, tmp_path):
    single, _ = sft.run(sft.SFTArgs(**COMMON, out="single", models_dir=str(tiny_store), progress=False,
                                    run_dir=str(tmp_path / "single")))

    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "finetune", "sft", *_cli({**COMMON, "out": "ddp", "models_dir": str(tiny_store), "progress": False,
                                          "run_dir": str(run_dir)})]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == single.steps == 5
    torch.testing.assert_close(metrics["history"]["train_loss"], single.history["train_loss"], rtol=1e-5, atol=1e-5)
    ddp_val = [v for _, v in metrics["history"]["val"]]
    torch.testing.assert_close(ddp_val, [v for _, v in single.history["val"]], rtol=1e-5, atol=1e-5)
    assert metrics["history"]["tokens_seen"] == single.history["tokens_seen"]
    # the saved models agree too (rank 0 wrote it once)
    _, a = store.read("single", tiny_store)
    _, b = store.read("ddp", tiny_store)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert store.read_manifest("ddp", tiny_store)["created_from"]["name"] == "tiny"
