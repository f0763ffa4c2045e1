"""The shared training loop behind ``sft``, ``lora`` and ``pretrain``: AdamW, token-mean loss, periodic validation,
a sample generation after each epoch, tqdm progress, interruption-safe checkpoints, DDP, loss plot and metrics.

It is the book's ``train_model_simple`` (Raschka, ch. 5/7: zero_grad -> loss -> backward -> step, ``evaluate_model``
every ``eval_freq`` steps over ``eval_iter`` batches, ``generate_and_print_sample`` after each epoch) with what a
workbench needs on top, shaped like litgpt's ``finetune/lora.py`` (``TrainArgs``, global vs micro batch). Its
neighbours hold the rest: :mod:`finetune.args` (options and CLI), :mod:`finetune.distributed` (ranks and batching),
:mod:`finetune.checkpoint` (resume state and RNG) and :mod:`finetune.runs` (loading a base and the data).

Batching is defined globally so that every run is reproducible across process counts and resumes:
``--batch-size`` is the global batch of one optimizer step. Each epoch draws one permutation from ``(seed, epoch)``
(the book's order in the first epoch); global batch ``k`` is rows ``[k*B, (k+1)*B)`` of it (``drop_last``); each of
the ``world_size`` DDP ranks takes a contiguous slice and splits it into ``grad_accum`` micro-batches. The loss of a
step is the mean over every target token of the global batch (the book's ``cross_entropy`` mean when there is one
micro-batch and one process), so one process and N processes, with or without accumulation, compute the same losses.
A resumed run skips the batches already done and restores weights, optimizer, RNG and loss history, so it continues
to the same losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.allocator import keep_freed_memory, release_freed_memory
from finetune.args import TrainArgs, validate_args
from finetune.checkpoint import (
    CHECKPOINT_DIRNAME,
    check_resume_args,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from finetune.data import IGNORE_INDEX
from finetune.distributed import DistInfo, all_reduce, barrier, epoch_batches, local_micro_batches

log = logging.getLogger(__name__)


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps and saves a checkpoint. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: finishing this step and saving a resumable checkpoint",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@dataclass
class TrainResult:
    """What a run produced; ``history`` is also written to metrics.json."""

    steps: int
    interrupted: bool
    history: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    run_dir: Path | None = None
    rank: int = 0
    """This process's DDP rank; only rank 0 writes outputs and reports."""


def core_module(model: nn.Module) -> nn.Module:
    """Unwrap DDP and peft to the GPT (with any LoRA layers injected) that engine.generate can drive."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def loss_sum_and_count(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the non-ignored targets, and their count (ignore_index=-100)."""
    keep = targets != IGNORE_INDEX
    with autocast:
        logits = model(inputs, keep=keep)  # (N, vocab): only the positions with a target
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Any, collate: Callable, *, batch_size: int, num_batches: int | None,
                  device: torch.device, autocast: contextlib.AbstractContextManager) -> float:
    """The book's ``calc_loss_loader``: mean of per-batch mean losses over the first ``num_batches`` batches."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    total_batches = math.ceil(n / batch_size)
    num = total_batches if num_batches is None else min(num_batches, total_batches)
    losses = []
    for k in range(num):
        inputs, targets = collate([dataset[i] for i in range(k * batch_size, min(n, (k + 1) * batch_size))])
        loss, count = loss_sum_and_count(model, inputs.to(device), targets.to(device), autocast)
        losses.append(loss.item() / max(count, 1))
    model.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")


def _count_tokens(items: Sequence[Any]) -> int:
    """Real (non-pad) tokens of a micro-batch's items: instruction pairs or sliding-window tensor pairs."""
    total = 0
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            total += len(item[1])
        elif isinstance(item, tuple) and isinstance(item[0], torch.Tensor):
            total += item[0].numel()
        else:
            total += len(item)
    return total


def make_autocast(dtype: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_optimizer(params: list[nn.Parameter], args: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``params``, fused into one kernel per step on CPU and CUDA.

    torch's default on CPU is the per-parameter loop, about ten elementwise passes over every weight, gradient and
    moment; the fused kernel makes one pass. SmolLM2-135M full SFT at batch 8: 0.55 s of optimizer time per step
    on 1 thread, and 11-17% more tokens/s fused (1 or 2 threads). LoRA's few parameters make no difference.
    HF's Trainer defaults to the same kernel (``adamw_torch_fused``).
    """
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)


def train(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    collate: Callable[[Sequence[Any]], tuple[torch.Tensor, torch.Tensor]],
    args: TrainArgs,
    *,
    info: DistInfo | None = None,
    run_dir: Path | None = None,
    sample_fn: Callable[[nn.Module], str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    shuffle: bool = True,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad; returns losses and timing.

    Args:
        model: the module to train (a GPT or a peft-wrapped GPT); it is moved to the device, and wrapped in DDP when
            the process group has more than one rank.
        train_data: indexable training items for ``collate`` (e.g. :class:`finetune.data.InstructionDataset`).
        val_data: indexable validation items (may be empty).
        collate: items -> (inputs, targets) on the CPU.
        args: the run's options.
        info: the process's place in a DDP run (default: single process).
        run_dir: checkpoints, metrics.json and loss.png go here (rank 0 writes).
        sample_fn: called on rank 0 after each epoch with the unwrapped model in eval mode; its text is logged.
        on_step: called after every optimizer step with (global step, loss), e.g. for tests.
        shuffle: shuffle the training data each epoch (pretraining on one text may keep order).
    """
    info = info or DistInfo()
    device = info.device
    validate_args(args)
    global_batch = args.batch_size
    if global_batch % (info.world_size * args.grad_accum):
        raise ValueError(f"--batch-size {global_batch} must be divisible by world size {info.world_size} x "
                         f"--grad-accum {args.grad_accum}")
    steps_per_epoch = len(train_data) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_data)} training examples are fewer than one batch of {global_batch}; use "
                         f"more data or a smaller --batch-size")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    autocast = make_autocast(args.dtype, device)

    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":  # every step frees and reallocates the same big tensors: keep their pages resident
        keep_freed_memory()
    torch.manual_seed(args.seed)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = build_optimizer(params, args, device)
    history: dict[str, Any] = {"step": [], "train_loss": [], "tokens_seen": [], "val": [], "samples": [],
                               "epoch_end_steps": []}
    step = 0
    if args.resume:
        if run_dir is None:
            raise ValueError("--resume needs a run directory")
        state = load_checkpoint(run_dir, model, optimizer)
        check_resume_args(json.loads(state["args"]), asdict(args))
        step = int(state["step"])
        history = json.loads(state["history"])
        if info.is_main:
            log.info("resumed from %s at step %d", run_dir / CHECKPOINT_DIRNAME, step)
    ddp_model = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def val_loss() -> float:
        return evaluate_loss(model, val_data, collate, batch_size=global_batch, num_batches=args.eval_iter,
                             device=device, autocast=autocast())

    def record_val(at_step: int) -> None:
        if info.is_main and len(val_data) and not any(s == at_step for s, _ in history["val"]):
            history["val"].append([at_step, val_loss()])

    def checkpoint_state() -> dict[str, Any]:
        return {"step": step, "args": json.dumps(asdict(args)), "history": json.dumps(history)}

    def record_sample(label: str) -> None:
        if info.is_main and sample_fn is not None and args.sample_tokens:
            core = core_module(model)
            core.eval()
            text = sample_fn(core)
            core.train()
            history["samples"].append({"step": step, "text": text})
            (bar.write if bar is not None else log.info)(f"{label} sample: {text!r}")

    bar = None
    if step == 0:
        record_val(0)
    if args.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    # Wall time and tokens accumulate across resumed segments (they live in the checkpointed history).
    wall_before, run_tokens = history.get("wall_time_s", 0.0), history.get("run_tokens", 0)
    interrupted = False
    stop = _StopFlag()
    batches: tuple[int, list[list[int]]] = (-1, [])
    with stop.installed():
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches[0] != epoch:
                batches = (epoch, epoch_batches(len(train_data), global_batch, seed=args.seed, epoch=epoch,
                                                shuffle=shuffle))
            batch_idx = batches[1][in_epoch]
            micro_batches = local_micro_batches(batch_idx, info, args.grad_accum)
            collated = []
            tokens = 0
            for mb in micro_batches:
                items = [train_data[i] for i in mb]
                tokens += _count_tokens(items)
                inputs, targets = collate(items)
                collated.append((inputs.to(device), targets.to(device)))
            # Normalise by the target count of the whole global batch, so the gradient is the book's token mean.
            counts = torch.tensor([float(sum(int((t != IGNORE_INDEX).sum()) for _, t in collated)), float(tokens)])
            counts = all_reduce(counts.to(device), info).cpu()
            global_count = max(counts[0].item(), 1.0)
            loss_total = torch.zeros((), device=device)
            for j, (inputs, targets) in enumerate(collated):
                sync = contextlib.nullcontext() if (not info.distributed or j == len(collated) - 1) \
                    else ddp_model.no_sync()
                with sync:
                    loss_sum, _ = loss_sum_and_count(ddp_model, inputs, targets, autocast())
                    # DDP averages gradients over ranks; scale by world size so the result is a sum / global count.
                    (loss_sum * (info.world_size / global_count)).backward()
                loss_total += loss_sum.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = all_reduce(loss_total, info).item() / global_count
            step += 1
            run_tokens += int(counts[1].item())
            seen = (history["tokens_seen"][-1] if history["tokens_seen"] else 0) + int(counts[1].item())
            history["step"].append(step)
            history["train_loss"].append(loss)
            history["tokens_seen"].append(seen)
            history["run_tokens"] = run_tokens
            history["wall_time_s"] = wall_before + time.perf_counter() - start
            if args.eval_every and step % args.eval_every == 0:
                record_val(step)
            if step % steps_per_epoch == 0:
                history["epoch_end_steps"].append(step)
                record_sample(f"epoch {step // steps_per_epoch}")
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{run_tokens / max(history['wall_time_s'], 1e-9):.0f}",
                                val=f"{history['val'][-1][1]:.3f}" if history["val"] else "-")
                bar.update(1)
            if on_step is not None:
                on_step(step, loss)
            flag = all_reduce(torch.tensor([1.0 if stop.requested else 0.0], device=device), info, "max")
            if flag.item() > 0 and step < total_steps:
                interrupted = True
                break
            if args.save_every and step % args.save_every == 0 and step < total_steps and run_dir is not None:
                if info.is_main:
                    save_checkpoint(run_dir, model, optimizer, checkpoint_state())
                barrier(info)
    if bar is not None:
        bar.close()
    if interrupted:
        if info.is_main and run_dir is not None:
            path = save_checkpoint(run_dir, model, optimizer, checkpoint_state())
            log.warning("interrupted at step %d/%d; checkpoint in %s (continue with --resume)", step, total_steps,
                        path)
        barrier(info)
    else:
        record_val(step)
        if step % steps_per_epoch:  # stopped by --max-steps inside an epoch: still show where the model is
            record_sample(f"step {step}")
    release_freed_memory()
    wall = history.get("wall_time_s", 0.0)
    result = TrainResult(steps=step, interrupted=interrupted, history=history, wall_time_s=wall,
                         tokens_per_s=history.get("run_tokens", 0) / max(wall, 1e-9), run_dir=run_dir,
                         rank=info.rank)
    if info.is_main and run_dir is not None:
        write_metrics(run_dir, result, args, info)
    return result


# ------------------------------------------------------------------------------------------------ outputs


def write_metrics(directory: Path, result: TrainResult, args: TrainArgs, info: DistInfo) -> None:
    """metrics.json + loss.png (matplotlib, Agg backend) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    h = result.history
    metrics = {
        "args": asdict(args),
        "world_size": info.world_size,
        "steps": result.steps,
        "interrupted": result.interrupted,
        "wall_time_s": result.wall_time_s,
        "tokens_per_s": result.tokens_per_s,
        "initial_val_loss": h["val"][0][1] if h["val"] and h["val"][0][0] == 0 else None,
        "final_val_loss": h["val"][-1][1] if h["val"] else None,
        "final_train_loss": h["train_loss"][-1] if h["train_loss"] else None,
        "history": h,
    }
    write_json_atomic(directory / "metrics.json", metrics)
    plot_losses(h, directory / "loss.png")


def plot_losses(history: dict[str, Any], path: Path) -> None:
    """The book's ``plot_losses``: train (per step) and validation loss against steps, tokens seen on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if history["train_loss"]:
        ax.plot(history["step"], history["train_loss"], label="train loss", linewidth=1)
    if history["val"]:
        vs, vl = zip(*history["val"])
        ax.plot(vs, vl, "o-", label="val loss", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    if history["tokens_seen"]:
        top = ax.twiny()
        top.plot(history["tokens_seen"], history["train_loss"], alpha=0)  # aligns the tokens-seen scale
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
