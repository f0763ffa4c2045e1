"""finetune.train / sft / pretrain on a tiny random GPT: the loss falls, outputs land in the store, resume is exact."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model import GPT
from finetune import sft
from finetune.args import TrainArgs, _attribute_docs
from finetune.distributed import DistInfo, epoch_batches, local_micro_batches
from finetune.pretrain import PretrainArgs
from finetune.pretrain import run as pretrain_run
from finetune.runs import load_base, prepare_instruction_run
from finetune.train import train
from weights import store

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "instruction-data.json"
TINY = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """A models root holding "tiny": a random 2-layer, 32-wide GPT-2-family model with the real GPT-2 tokenizer."""
    root = tmp_path_factory.mktemp("ft_store")
    torch.manual_seed(123)
    model = GPT(TINY)
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    store.add_model("tiny", TINY.to_dict(), model.state_dict(), tokenizer=tok, files=files, prompt_format="alpaca",
                    root=root)
    return root


def _args(root: Path, tmp_path: Path, **kw) -> sft.SFTArgs:
    base = dict(model="tiny", data=str(DATA), format="alpaca", out="tiny-sft", models_dir=str(root), limit=48,
                batch_size=4, epochs=2, lr=2e-3, eval_every=5, eval_iter=2, sample_tokens=4, progress=False,
                run_dir=str(tmp_path / "run"))
    base.update(kw)
    return sft.SFTArgs(**base)


def test_global_batches_are_split_across_ranks_and_micro_batches():
    batches = epoch_batches(10, 4, seed=123, epoch=0)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    assert batches == epoch_batches(10, 4, seed=123, epoch=0)
    assert batches != epoch_batches(10, 4, seed=123, epoch=1)
    b = batches[0]
    r0 = local_micro_batches(b, DistInfo(rank=0, world_size=2), grad_accum=2)
    r1 = local_micro_batches(b, DistInfo(rank=1, world_size=2), grad_accum=2)
    assert r0 == [[b[0]], [b[1]]] and r1 == [[b[2]], [b[3]]]


def test_train_args_have_docstrings_for_help():
    docs = _attribute_docs(sft.SFTArgs)
    assert set(docs) >= {f for f in TrainArgs.__dataclass_fields__} | {"save_dtype", "overwrite"}
    assert "Global batch" in docs["batch_size"]


@pytest.mark.parametrize("command", ["sft", "lora", "pretrain", "evaluate", "bench"])
def test_every_command_help_renders(command, capsys):
    """--help shows every option's docstring; a literal % in one ("the book's 10%") must not break argparse."""
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"finetune.{command}").main(["--help"])
    assert done.value.code == 0 and "--" in capsys.readouterr().out


def test_sft_loss_falls_and_model_lands_in_store(tiny_store, tmp_path):
    args = _args(tiny_store, tmp_path, max_length=60)
    result, manifest = sft.run(args)
    losses = result.history["train_loss"]
    # 40 train entries, 12 of them longer than 60 tokens: 28 -> 7 batches of 4 per epoch
    assert not result.interrupted and result.steps == len(losses) == 14
    assert abs(losses[0] - math.log(50257)) < 0.1  # an untrained model is uniform over the vocabulary
    assert losses[-1] < losses[0] - 1.0
    val = result.history["val"]
    assert val[0][0] == 0 and val[-1][0] == result.steps and val[-1][1] < val[0][1]
    assert len(result.history["samples"]) == 2  # one sample generation per epoch

    # the new model: same config and tokenizer, the format it was trained with, its base and hyperparameters
    assert manifest["name"] == "tiny-sft" and manifest["prompt_format"] == "alpaca"
    base_manifest = store.read_manifest("tiny", tiny_store)
    cf = manifest["created_from"]
    assert cf["name"] == "tiny" and cf["sha256"] == base_manifest["sha256"] and cf["method"] == "sft"
    assert cf["hyperparameters"]["lr"] == 2e-3 and cf["hyperparameters"]["batch_size"] == 4
    assert cf["hyperparameters"]["skipped"] == {"train": 12, "val": 1}  # longer than --max-length 60
    assert [m["name"] for m in store.list_models(tiny_store)] == ["tiny", "tiny-sft"]
    folder = store.model_dir("tiny-sft", tiny_store)
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["history"]["train_loss"] == losses and metrics["tokens_per_s"] > 0
    # the saved weights are the trained ones and load back in the engine's model
    reloaded = load_base("tiny-sft", tiny_store)
    x = torch.randint(0, 50257, (1, 8))
    torch.testing.assert_close(reloaded.model(x), result_model_logits(tiny_store, tmp_path, x, args), rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        sft.run(args)


def result_model_logits(root: Path, tmp_path: Path, x: torch.Tensor, args: sft.SFTArgs) -> torch.Tensor:
    """Logits of the model saved by the run above, read through weights.store directly."""
    _, state = store.read("tiny-sft", root)
    model = GPT(TINY)
    model.load_state_dict(state)
    return model(x)


def test_resume_after_sigterm_matches_uninterrupted_run(tiny_store, tmp_path):
    # 24 entries -> 20 train -> 5 steps per epoch; interrupted inside the second epoch
    full, _ = sft.run(_args(tiny_store, tmp_path / "a", out="tiny-full", limit=24, eval_iter=1))

    def interrupt(step: int, loss: float) -> None:
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler: finish the step, save a checkpoint

    part_args = _args(tiny_store, tmp_path / "b", out="tiny-resumed", limit=24, eval_iter=1)
    part, manifest = sft.run(part_args, on_step=interrupt)
    assert part.interrupted and part.steps == 7 and manifest is None
    assert (tmp_path / "b" / "run" / "checkpoint" / "state.pt").is_file()
    assert not store.model_dir("tiny-resumed", tiny_store).exists()
    state = torch.load(tmp_path / "b" / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 7 and isinstance(state["rng"]["torch"], torch.Tensor)

    part_args.resume = True
    resumed, manifest = sft.run(part_args)
    assert not resumed.interrupted and manifest is not None
    assert resumed.history["train_loss"] == full.history["train_loss"]  # exactly the same losses
    assert resumed.history["val"] == full.history["val"]
    _, a = store.read("tiny-full", tiny_store)
    _, b = store.read("tiny-resumed", tiny_store)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "run" / "checkpoint").exists()  # cleaned up once the model is saved


def test_resume_refuses_changed_options_and_missing_checkpoint(tiny_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sft.run(_args(tiny_store, tmp_path, out="tiny-x", resume=True))
    args = _args(tiny_store, tmp_path, out="tiny-x", limit=12, max_steps=2, save_every=1, epochs=1)
    sft.run(args)  # finished: the checkpoint is gone with the saved model
    assert not (tmp_path / "run" / "checkpoint").exists()

    def interrupt(step: int, loss: float) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    args = _args(tiny_store, tmp_path, out="tiny-y", limit=12, epochs=1)
    assert sft.run(args, on_step=interrupt)[0].interrupted
    with pytest.raises(ValueError, match=r"different options than the checkpoint.*'lr': \(0.002, 0.001\)"):
        sft.run(_args(tiny_store, tmp_path, out="tiny-y", limit=12, epochs=1, lr=1e-3, resume=True))


def test_grad_accum_and_bf16(tiny_store, tmp_path):
    run = prepare_instruction_run(_args(tiny_store, tmp_path))

    def losses(**kw) -> list[float]:
        base = load_base("tiny", tiny_store)
        args = _args(tiny_store, tmp_path, max_steps=3, sample_tokens=0, eval_every=0, **kw)
        return train(base.model, run.train_set, run.val_set, run.collate, args).history["train_loss"]

    plain = losses()
    torch.testing.assert_close(losses(grad_accum=2), plain, rtol=1e-5, atol=1e-5)  # same global batch, same loss
    bf16 = losses(dtype="bf16")
    torch.testing.assert_close(bf16, plain, rtol=0, atol=0.1)
    with pytest.raises(ValueError, match="divisible"):
        losses(grad_accum=3)


def test_bad_options_are_errors(tiny_store, tmp_path):
    with pytest.raises(ValueError, match="--format"):
        sft.run(_args(tiny_store, tmp_path, format="vicuna", out="bad-1"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        sft.run(_args(tiny_store, tmp_path, limit=8, batch_size=8, out="bad-2"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "input": ""}]))
    with pytest.raises(ValueError, match="entry 0 is missing the field 'output'"):
        sft.run(_args(tiny_store, tmp_path, data=str(bad), out="bad-3"))


def test_cli_help_lists_common_options(capsys):
    with pytest.raises(SystemExit) as exc:
        sft.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--format", "--out", "--epochs", "--batch-size", "--lr", "--weight-decay",
                 "--max-length", "--grad-accum", "--mask-instructions", "--seed", "--dtype", "--resume"):
        assert flag in out
    assert "(default: 5e-05)" in out and "(default: 123)" in out


def test_pretrain_on_the_verdict(tmp_path):
    args = PretrainArgs(data=str(SHARED / "data" / "the-verdict.txt"), preset="gpt2-small",
                        config=json.dumps({"context_length": 32, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                           "n_kv_heads": 2, "ffn_dim": 64}),
                        tokenizer_dir=str(SHARED / "data" / "gpt2"), out="verdict-tiny", models_dir=str(tmp_path),
                        batch_size=8, epochs=1, max_steps=12, lr=4e-3, eval_every=6, eval_iter=2, sample_tokens=5,
                        progress=False, run_dir=str(tmp_path / "run"))
    result, manifest = pretrain_run(args)
    losses = result.history["train_loss"]
    assert abs(losses[0] - math.log(50257)) < 0.1 and losses[-1] < losses[0] - 1.0
    assert result.history["tokens_seen"][-1] == 12 * 8 * 32
    assert manifest["prompt_format"] == "none" and manifest["created_from"] is None
    assert manifest["config"]["context_length"] == 32
    assert result.history["samples"][0]["text"].startswith("Every effort moves you")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_on_kept_positions_equals_the_full_head(family):
    """``keep`` computes the head only where a target exists; loss and every gradient equal the full-logits loss."""
    from finetune.train import loss_sum_and_count

    cfg = TINY if family == "gpt2" else ModelConfig(
        vocab_size=300, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    inputs = torch.randint(0, 200, (3, 10))
    targets = torch.randint(0, 200, (3, 10))
    targets[0, :4] = -100  # a masked instruction
    targets[2, 6:] = -100  # padding
    full = model(inputs)
    kept = model(inputs, keep=targets != -100)
    torch.testing.assert_close(kept, full[targets != -100])

    loss, count = loss_sum_and_count(model, inputs, targets, torch.autocast("cpu", enabled=False))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert count == int((targets != -100).sum())
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    with pytest.raises(ValueError, match="keep must be"):
        model(inputs, keep=targets[:, :5] != -100)
