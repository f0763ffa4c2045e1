"""The shared training loop behind ``sft``, ``lora`` and ``pretrain``: AdamW, token-mean loss, periodic validation,
a sample generation after each epoch, tqdm progress, resumable checkpoints, DDP, loss plot and metrics.

It is the book's ``train_model_simple`` (Raschka, ch. 5/7: zero_grad -> loss -> backward -> step, ``evaluate_model``
every ``eval_freq`` steps over ``eval_iter`` batches, ``generate_and_print_sample`` after each epoch) with what a
workbench needs on top, shaped like litgpt's ``finetune/lora.py`` (``TrainArgs``, global vs micro batch).

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

import argparse
import ast
import contextlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data import IGNORE_INDEX, cache_dir, shuffled_order

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoint"
# Options that may differ on --resume (everything else, LoRA rank/alpha/targets included, must match the checkpoint).
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "max_steps", "eval_every", "eval_iter", "save_every",
                               "sample_tokens", "run_dir", "models_dir", "device", "threads", "progress",
                               "overwrite", "grad_accum", "dtype", "save_dtype"})


@dataclass
class TrainArgs:
    """Options shared by every training command (defaults follow the book's ch. 7)."""

    model: str | None = None
    """Base model name in the store ($CHAT_MODELS_DIR)."""
    data: str | None = None
    """Training data file; for sft/lora a JSON/JSONL with instruction/input/output (default: the book's
    instruction-data.json, downloaded once into the cache)."""
    format: str = field(default="alpaca", metadata={"choices": ("alpaca", "phi3", "chatml", "none")})
    """Prompt format: alpaca, phi3 or chatml (none: plain text, for pretraining)."""
    out: str | None = None
    """Name of the new model (sft/pretrain) or adapter (lora) in the store."""
    epochs: int = 2
    """Passes over the training split."""
    batch_size: int = 8
    """Global batch of one optimizer step; split across DDP processes and --grad-accum micro-batches."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    max_length: int | None = None
    """Longest training sequence in tokens (collate's allowed_max_length); default: the model's context length.
    Longer entries are skipped and counted."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the global batch is split into this many forward passes)."""
    mask_instructions: bool = False
    """Ignore the prompt tokens in the loss (the book's exercise 7.2)."""
    seed: int = 123
    """Seed for initialisation, data order and dropout."""
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    """Compute dtype: fp32, or bf16 (autocast on CPU and GPU; master weights stay fp32)."""
    resume: bool = False
    """Continue from the run directory's checkpoint (written on Ctrl-C/SIGTERM or every --save-every steps)."""
    eval_every: int = 20
    """Compute the validation loss every this many optimizer steps (0: only before and after training)."""
    eval_iter: int = 5
    """Validation batches per evaluation (the book's eval_iter)."""
    save_every: int = 0
    """Also write a resumable checkpoint every this many steps (0: only on interruption)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (the output is still saved)."""
    limit: int | None = None
    """Use only the first N data entries before the split (quick experiments)."""
    sample_tokens: int = 35
    """New tokens of the sample generation on the first validation entry after each epoch (0: off)."""
    run_dir: str | None = None
    """Where checkpoints, metrics and the loss plot go while training (default: <cache>/runs/<out>)."""
    models_dir: str | None = None
    """Model store root (default: $CHAT_MODELS_DIR or ./models)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int | None = None
    """torch intra-op CPU threads (default: torch's choice; torchrun sets 1 per process)."""
    progress: bool = True
    """Show a tqdm progress bar."""


# ----------------------------------------------------------------------------------------------------- argparse


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field), for --help, like litgpt's jsonargparse use."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not hasattr(klass, "__dataclass_fields__"):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = ()) -> None:
    """One ``--kebab-name`` option per dataclass field, typed from its annotation, helped by its docstring."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        help_text = docs.get(f.name, "")
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=default, help=help_text,
                                choices=f.metadata.get("choices"))


def build_parser(cls: type, prog: str, description: str, *, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, cls, skip=skip)
    return parser


def args_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def validate_args(args: TrainArgs) -> None:
    """Raise ValueError for option values that cannot work, naming the fix."""
    if args.format not in ("alpaca", "phi3", "chatml", "none"):
        raise ValueError(f"--format must be alpaca, phi3 or chatml, got {args.format!r}")
    if args.dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {args.dtype!r}")
    for name in ("epochs", "batch_size", "grad_accum", "eval_iter"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")


# ------------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a run: rank 0 of 1 unless started by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when started by ``torchrun`` (nccl on GPU, gloo on CPU); otherwise a single process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        dev = torch.device(device if device not in ("auto",) else ("cuda" if use_cuda else "cpu"))
        return DistInfo(device=dev)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if not info.distributed:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Global batches of one epoch: a seeded permutation (the book's order in epoch 0) cut into ``batch_size`` rows,
    drop_last. Every rank computes the same batches; resuming recomputes them from (seed, epoch)."""
    if shuffle:
        order = shuffled_order(n, seed, epoch)
    else:
        order = list(range(n))
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(n // batch_size)]


def local_micro_batches(global_batch: Sequence[int], info: DistInfo, grad_accum: int) -> list[list[int]]:
    """This rank's contiguous slice of a global batch, split into ``grad_accum`` micro-batches."""
    per_rank = len(global_batch) // info.world_size
    mine = list(global_batch[info.rank * per_rank:(info.rank + 1) * per_rank])
    micro = per_rank // grad_accum
    return [mine[j * micro:(j + 1) * micro] for j in range(grad_accum)]


# ------------------------------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict[str, torch.Tensor]:
    """Every RNG as tensors, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
    }
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_extra"] = torch.tensor([pos, has_gauss, cached], dtype=torch.float64)
    except ImportError:  # numpy is optional for torch
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss[0] if gauss else None))
    if "numpy" in state:
        import numpy as np

        pos, has_gauss, cached = state["numpy_extra"].tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (all for full SFT, the ``lora_`` ones for LoRA), detached and contiguous."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place; the old dir (if any) is removed only after the new one is in place."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint/`` atomically: trainable weights (safetensors) + optimizer/step/RNG (torch.save)."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint-"))
    try:
        save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"))
        torch.save({**state, "optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
        final = run_dir / CHECKPOINT_DIRNAME
        _atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable weights, optimizer and RNG from ``run_dir/checkpoint``; return the saved loop state."""
    from safetensors.torch import load_file

    ckpt = run_dir / CHECKPOINT_DIRNAME
    if not (ckpt / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint to resume in {ckpt}; run without --resume (or pass the --run-dir "
                                f"of the interrupted run)")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(f"checkpoint in {ckpt} holds {len(weights)} tensors but the model trains {len(expected)}; "
                         f"missing {missing}, unexpected {unexpected}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    _set_rng_state(state.pop("rng"))
    return state


# ------------------------------------------------------------------------------------------------ the loop


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
    with autocast:
        logits = model(inputs)  # (B, T, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


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
    torch.manual_seed(args.seed)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    history: dict[str, Any] = {"step": [], "train_loss": [], "tokens_seen": [], "val": [], "samples": [],
                               "epoch_end_steps": []}
    step = 0
    if args.resume:
        if run_dir is None:
            raise ValueError("--resume needs a run directory")
        state = load_checkpoint(run_dir, model, optimizer)
        saved_args = json.loads(state["args"])
        mismatched = {k: (saved_args.get(k), v) for k, v in asdict(args).items()
                      if k not in RESUMABLE_CHANGES and saved_args.get(k) != v}
        if mismatched:
            raise ValueError(f"--resume with different options than the checkpoint (saved, now): {mismatched}")
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
            counts = _all_reduce(counts.to(device), info).cpu()
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
            loss = _all_reduce(loss_total, info).item() / global_count
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
            flag = _all_reduce(torch.tensor([1.0 if stop.requested else 0.0], device=device), info, "max")
            if flag.item() > 0 and step < total_steps:
                interrupted = True
                break
            if args.save_every and step % args.save_every == 0 and step < total_steps and run_dir is not None:
                if info.is_main:
                    save_checkpoint(run_dir, model, optimizer, checkpoint_state())
                _barrier(info)
    if bar is not None:
        bar.close()
    if interrupted:
        if info.is_main and run_dir is not None:
            path = save_checkpoint(run_dir, model, optimizer, checkpoint_state())
            log.warning("interrupted at step %d/%d; checkpoint in %s (continue with --resume)", step, total_steps,
                        path)
        _barrier(info)
    else:
        record_val(step)
        if step % steps_per_epoch:  # stopped by --max-steps inside an epoch: still show where the model is
            record_sample(f"step {step}")
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
    _write_json_atomic(directory / "metrics.json", metrics)
    plot_losses(h, directory / "loss.png")


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


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


def default_run_dir(args: TrainArgs, kind: str) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    name = args.out or f"{kind}-run"
    base = f"{args.model}--{name}" if kind == "lora" and args.model else name
    return cache_dir() / "runs" / kind / base



# ------------------------------------------------------------------------------------------ models and runs


@dataclass
class BaseModel:
    """A store model loaded for training: fp32 weights, trainable, on the CPU."""

    name: str
    manifest: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    model_dir: Path

    @property
    def sha256(self) -> str:
        return self.manifest.get("sha256") or ""

    def tokenizer_files(self) -> dict[str, Path]:
        """The tokenizer files of the base folder, to copy into a derived model (destination name -> path)."""
        files = (self.manifest.get("tokenizer") or {}).get("files") or {}
        return {f: self.model_dir / f for f in files.values()}


def load_base(name: str, root: str | Path | None = None) -> BaseModel:
    """Load ``name`` from the store as a float32 GPT in train mode (weights copied out of the mmap)."""
    from engine.config import ModelConfig
    from engine.model import GPT
    from engine.tokenizer import load_tokenizer
    from weights import store

    manifest, state = store.read(name, root)
    config = ModelConfig.from_dict(manifest["config"])
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu").float()
    model.load_state_dict(state, strict=True)
    if config.pos_emb == "rope":  # non-persistent angle tables, rebuilt after to_empty
        from engine.model import build_rope_cache

        model.rope_cos, model.rope_sin = build_rope_cache(config)
    del state
    model_dir = store.model_dir(name, root)
    tokenizer = load_tokenizer(model_dir, manifest.get("tokenizer") or {"type": "none"})
    return BaseModel(name=name, manifest=manifest, model=model, tokenizer=tokenizer, model_dir=model_dir)


def end_of_text_id(tokenizer: Any, fmt: Any) -> int:
    """The id that ends every training row (and pads it): ChatML's ``<|im_end|>`` when it is a special token,
    else the tokenizer's first EOS (GPT-2: 50256, the book's pad and end-of-text)."""
    if fmt.name == "chatml" and tokenizer.is_special("<|im_end|>"):
        return tokenizer.special_id("<|im_end|>")
    if not tokenizer.eos_token_ids:
        raise ValueError("the tokenizer has no end-of-text id; the model's manifest must list eos_token_ids")
    return int(tokenizer.eos_token_ids[0])


@dataclass
class InstructionRun:
    """Everything an instruction-finetuning command needs besides the model-specific part."""

    base: BaseModel
    fmt: Any
    train_set: Any
    val_set: Any
    test_entries: list[dict[str, str]]
    val_entries: list[dict[str, str]]
    collate: Callable[[Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]
    max_length: int
    eos_id: int
    skipped: dict[str, int]


def prepare_instruction_run(args: TrainArgs, base: BaseModel | None = None) -> InstructionRun:
    """Load the base and the data, split it the book's way and build datasets + collate for ``args``."""
    from functools import partial

    from engine.prompts import get_prompt_format
    from finetune.data import InstructionDataset, custom_collate_fn, load_instruction_data, split_data

    if not args.model:
        raise ValueError("--model is required: the name of a base model in the store (python -m weights list)")
    base = base or load_base(args.model, args.models_dir)
    fmt = get_prompt_format(args.format)
    entries = load_instruction_data(args.data)
    if args.limit is not None:
        entries = entries[:args.limit]
    train_entries, test_entries, val_entries = split_data(entries)
    context = base.model.config.context_length
    max_length = min(args.max_length or context, context)
    eos = end_of_text_id(base.tokenizer, fmt)
    train_set = InstructionDataset(train_entries, base.tokenizer, fmt, max_length=max_length, eos_token_id=eos)
    val_set = InstructionDataset(val_entries, base.tokenizer, fmt, max_length=max_length, eos_token_id=eos)
    collate = partial(custom_collate_fn, pad_token_id=eos, eos_token_id=eos, allowed_max_length=max_length,
                      mask_instructions=args.mask_instructions)
    return InstructionRun(base=base, fmt=fmt, train_set=train_set, val_set=val_set, test_entries=test_entries,
                          val_entries=val_entries, collate=collate, max_length=max_length, eos_id=eos,
                          skipped={"train": len(train_set.skipped), "val": len(val_set.skipped)})


def build_sample_fn(run: InstructionRun, max_new_tokens: int) -> Callable[[nn.Module], str] | None:
    """After each epoch, the book's sample: a greedy answer to the first validation entry, through the engine."""
    if not run.val_entries or max_new_tokens <= 0:
        return None
    from finetune.evaluate import generate_response

    entry = run.val_entries[0]

    def sample(model: nn.Module) -> str:
        return generate_response(model, run.base.tokenizer, run.fmt, entry, max_new_tokens=max_new_tokens)

    return sample


def early_exit_code(result: TrainResult) -> int | None:
    """The command's exit code when there is nothing to report: ranks other than 0, or an interrupted run (130,
    after saying how to resume). ``None`` means rank 0 finished and should print its summary."""
    if result.rank != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted after step {result.steps}; resume with the same command plus --resume "
              f"(checkpoint in {result.run_dir})")
        return 130
    return None


def setup_logging(info: DistInfo) -> None:
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
