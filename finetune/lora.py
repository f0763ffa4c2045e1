"""``python -m finetune lora``: LoRA instruction finetuning through peft; the result is a standard PEFT adapter.

The base GPT keeps separate ``nn.Linear`` q/k/v/o/gate/up/down projections, so peft's ``LoraConfig`` names them in
``target_modules`` with no task type (peft's custom-model guide), ``get_peft_model`` freezes the base and only the
``lora_`` parameters train (Hu et al. 2021; the book's appendix E; Burkov sec. 5.5). The adapter goes to
``$CHAT_MODELS_DIR/<base>/adapters/<name>/`` as ``save_pretrained`` writes it (adapter_config.json +
adapter_model.safetensors) plus ``scratchchat.json`` (base name and sha256, prompt format, hyperparameters,
metrics), written atomically. This is the only module that imports peft.

Scaling convention: peft's, ``W x + (lora_alpha / r) * B A x``. The book's appendix E (and exercise 7.4) scaled by
``alpha`` alone, so its ``rank=16, alpha=16`` is 16x stronger than peft's ``r=16, lora_alpha=16``; the default
learning rate here is therefore higher than full SFT's (see ``LoraArgs.lr``).

Usage:
    python -m finetune lora --model smollm2-135m-instruct --format chatml --out alpaca-r16 --rank 16 --alpha 16
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.args import TrainArgs, args_from_namespace, build_parser, validate_args
from finetune.distributed import setup_distributed, setup_logging, teardown_distributed
from finetune.runs import build_sample_fn, default_run_dir, early_exit_code, prepare_instruction_run
from finetune.sft import hyperparameters
from finetune.train import TrainResult, train

log = logging.getLogger(__name__)

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALING_CONVENTION = "peft: lora_alpha / r (the book's appendix E scaled by alpha alone)"


@dataclass
class LoraArgs(TrainArgs):
    """Options of ``python -m finetune lora``."""

    lr: float = 5e-4
    """AdamW learning rate. 10x the full-SFT default: peft scales the update by alpha/r (1 at r = alpha = 16) where
    the book's LoRA scaled by alpha (16)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    targets: str = ",".join(ALL_TARGETS)
    """Comma-separated projections to adapt (those the model lacks, e.g. gate_proj on GPT-2, are left out)."""
    overwrite: bool = False
    """Replace an existing adapter named --out."""


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """The requested projection names that exist in ``model`` (ValueError on unknown names or no match)."""
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"unknown --targets {unknown}; choose from {', '.join(ALL_TARGETS)}")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in wanted if t in present]
    if not found:
        have = sorted(present & set(ALL_TARGETS))
        raise ValueError(f"none of --targets {wanted} exist in this model (it has {have})")
    return found


def apply_lora(model: nn.Module, args: LoraArgs) -> nn.Module:
    """Wrap ``model`` with peft LoRA layers; only ``lora_`` parameters stay trainable."""
    from peft import LoraConfig, get_peft_model

    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    torch.manual_seed(args.seed)  # lora_A's random init (lora_B starts at zero, so the model is unchanged)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=target_modules(model, args.targets), bias="none")
    peft_model = get_peft_model(model, config)
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if bad:
        raise RuntimeError(f"peft left non-LoRA parameters trainable: {bad[:3]}")
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def run(args: LoraArgs, *, on_step: Callable[[int, float], None] | None = None) -> tuple[TrainResult, Path | None]:
    """Train and save; returns the result and the adapter folder (None when interrupted or on ranks > 0)."""
    from weights import store

    validate_args(args)
    if not args.out:
        raise ValueError("--out NAME is required: the name of the new adapter")
    if not args.model:
        raise ValueError("--model is required: the base model in the store (python -m weights list)")
    final = store.adapter_dir(args.model, args.out, args.models_dir)
    if final.exists() and not args.overwrite and not args.resume:
        raise FileExistsError(f"adapter {args.out!r} of {args.model!r} already exists; pick another --out or pass "
                              f"--overwrite")
    info = setup_distributed(args.device)
    try:
        setup_logging(info)
        run_ = prepare_instruction_run(args)
        peft_model = apply_lora(run_.base.model, args)
        trainable, total = count_parameters(peft_model)
        if info.is_main:
            log.info("LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.2f%%); %d train / %d val examples "
                     "(%d skipped)", args.rank, args.alpha, run_.base.name, f"{trainable:,}", f"{total:,}",
                     100 * trainable / total, len(run_.train_set), len(run_.val_set), run_.skipped["train"])
        run_dir = default_run_dir(args, "lora")
        result = train(peft_model, run_.train_set, run_.val_set, run_.collate, args, info=info, run_dir=run_dir,
                       sample_fn=build_sample_fn(run_, args.sample_tokens), on_step=on_step)
        path = None
        if not result.interrupted and info.is_main:
            path = save_adapter(peft_model, args, run_.base, result, run_dir,
                                extra={"trainable_parameters": trainable, "skipped": run_.skipped})
        return result, path
    finally:
        teardown_distributed(info)


def save_adapter(peft_model: nn.Module, args: LoraArgs, base: Any, result: TrainResult, run_dir: Path | None, *,
                 extra: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` + scratchchat.json (+ loss plot and metrics) into the store, atomically."""
    from weights import store

    final = store.adapter_dir(base.name, args.out, args.models_dir)
    meta = {
        "base": base.name,
        "base_sha256": base.sha256,
        "prompt_format": args.format,
        "method": "lora",
        "scaling": SCALING_CONVENTION,
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "target_modules": target_modules(peft_model, args.targets),
        "hyperparameters": hyperparameters(args, **(extra or {})),
        "train_steps": result.steps,
        "final_train_loss": result.history["train_loss"][-1] if result.history["train_loss"] else None,
        "final_val_loss": result.history["val"][-1][1] if result.history["val"] else None,
    }
    with store.atomic_dir(final, overwrite=args.overwrite or args.resume) as tmp:
        peft_model.save_pretrained(str(tmp))
        config_path = tmp / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = base.name
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        meta["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (tmp / "scratchchat.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if run_dir is not None:
            for name in ("loss.png", "metrics.json"):
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, tmp / name)
    if run_dir is not None:
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(LoraArgs, "python -m finetune lora",
                          "LoRA instruction finetuning (peft) of a store model into an adapter next to it.")
    args = args_from_namespace(LoraArgs, parser.parse_args(argv))
    result, path = run(args)
    if (code := early_exit_code(result)) is not None:
        return code
    if path is not None:
        print(f"saved adapter {args.out} of {args.model} to {path} ({result.steps} steps, "
              f"{result.tokens_per_s:.0f} tokens/s, {result.wall_time_s:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
