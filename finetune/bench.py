"""``python -m finetune bench``: training throughput on one model, data set and batch, measured in one run.

Cases (each in its own subprocess, so its peak RSS is its own):

* ``ours-lora``: our loop (:func:`finetune.train.train`) on our GPT with peft LoRA;
* ``ours-full``: our loop, every parameter trained (full SFT);
* ``hf-lora``: HF ``Trainer`` + ``peft`` on ``transformers``' own model class built from the same weights
  (:func:`weights.hf.write`), fed the very same batches (same order, same padding, same -100 targets through
  ``shift_labels``), AdamW with the same settings;
* ``hf-full`` (optional): HF ``Trainer`` full finetuning.

Both loops run fused AdamW (HF's default ``adamw_torch_fused``, ours through :func:`finetune.train.build_optimizer`)
with the same hyperparameters and no gradient clipping. Our loop also keeps freed memory in glibc's heap
(:mod:`finetune.allocator`); HF's Trainer runs with the default allocator unless ``--same-allocator`` gives it ours,
which isolates the loops and models from that setting.

Throughput is non-pad tokens per second over the timed steps (after ``--warmup`` steps). Memory is the worker's
resident high-water mark (``VmHWM``) during the training loop: it is reset once the model is loaded, so loading
transients, identical in every case, do not mask the difference between LoRA and full SFT. (``ru_maxrss`` is no
use here: a child spawned by ``vfork`` inherits its parent's high-water mark.) The whole-process peak is reported
too. The report gives ours-vs-HF for LoRA (target >= 1.0x) and LoRA-vs-full for ours (target >= 1.25x, and lower
peak memory).

The machine may be shared, and on 2 cores a competing process can slow an OpenMP step tenfold while it runs. So the
cases run ``--rounds`` times, in a rotated order each round; the report gives each case's median and range over the
rounds, and each ratio as the median of the ratios within a round. ``transformers`` is imported only by the
``hf-*`` workers, as the peer being measured.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CASES = ("ours-lora", "ours-full", "hf-lora", "hf-full")


@dataclass
class BenchArgs:
    """Options of ``python -m finetune bench``."""

    model: str = "smollm2-135m-instruct"
    """Model name in the store."""
    data: str | None = None
    """Instruction data (default: the book's instruction-data.json)."""
    format: str = field(default="alpaca", metadata={"choices": ("alpaca", "phi3", "chatml")})
    """Prompt format."""
    batch_size: int = 8
    """Batch size of every case."""
    steps: int = 8
    """Timed optimizer steps per case."""
    warmup: int = 2
    """Untimed steps first."""
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    """Compute dtype (bf16 = autocast in both loops)."""
    rank: int = 16
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha."""
    lr: float = 5e-4
    """AdamW learning rate (all cases)."""
    cases: str = "ours-lora,ours-full,hf-lora"
    """Comma-separated cases to run: ours-lora, ours-full, hf-lora, hf-full."""
    rounds: int = 3
    """Run every case this many times (rotating the order) and report medians and ranges."""
    same_allocator: bool = False
    """Give the HF workers our allocator setting too (finetune.allocator), to compare the loops and models alone."""
    models_dir: str | None = None
    """Model store root (default: $CHAT_MODELS_DIR or ./models)."""
    json_out: str | None = None
    """Also write the results as JSON here."""
    seed: int = 123
    """Seed for the data order and LoRA init."""


# ------------------------------------------------------------------------------------------------ workers


def _peak_rss_mib() -> float:
    """This process's resident high-water mark (VmHWM; KiB in /proc), in MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024.0


def _reset_peak_rss() -> float:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5) and return the peak up to now, in MiB."""
    before = _peak_rss_mib()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    return before


def _batches(spec: dict[str, Any]) -> tuple[Any, list[list[int]], Any]:
    """(run, the global batches of the first epoch in our order, base) shared by every case."""
    from finetune.args import TrainArgs
    from finetune.distributed import epoch_batches
    from finetune.runs import prepare_instruction_run

    args = TrainArgs(model=spec["model"], data=spec["data"], format=spec["format"], models_dir=spec["models_dir"],
                     batch_size=spec["batch_size"], seed=spec["seed"])
    run = prepare_instruction_run(args)
    n = spec["warmup"] + spec["steps"]
    batches = epoch_batches(len(run.train_set), spec["batch_size"], seed=spec["seed"], epoch=0)
    if len(batches) < n:
        raise ValueError(f"only {len(batches)} batches in one epoch; use fewer --steps/--warmup")
    return run, batches[:n], run.base


def _rate(spec: dict[str, Any], stamps: list[float], tokens: list[int], load_peak: float) -> dict[str, float]:
    w = spec["warmup"]
    timed = sum(tokens[w:len(stamps)])
    seconds = stamps[-1] - stamps[w - 1] if w > 0 else stamps[-1] - stamps[0]
    train_peak = _peak_rss_mib()
    return {"tokens": timed, "seconds": seconds, "tokens_per_s": timed / seconds, "train_peak_rss_mib": train_peak,
            "peak_rss_mib": max(load_peak, train_peak)}


def worker_ours(spec: dict[str, Any], lora: bool) -> dict[str, Any]:
    from finetune.args import TrainArgs
    from finetune.lora import LoraArgs, apply_lora
    from finetune.train import train

    run, batches, base = _batches(spec)
    model = base.model
    if lora:
        model = apply_lora(model, LoraArgs(rank=spec["rank"], alpha=spec["alpha"], dropout=0.0, seed=spec["seed"]))
    tokens = [sum(len(run.train_set[i][1]) for i in b) for b in batches]
    stamps: list[float] = []
    args = TrainArgs(batch_size=spec["batch_size"], lr=spec["lr"], seed=spec["seed"], dtype=spec["dtype"],
                     epochs=1, max_steps=len(batches), eval_every=0, sample_tokens=0, progress=False)
    load_peak = _reset_peak_rss()
    start = time.perf_counter()
    train(model, run.train_set, [], run.collate, args, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    if spec["warmup"] == 0:
        stamps.insert(0, start)
    return _rate(spec, stamps, tokens, load_peak)


def worker_hf(spec: dict[str, Any], lora: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    run, batches, base = _batches(spec)
    order = [i for b in batches for i in b]
    train_set, our_collate = run.train_set, run.collate
    tokens = [sum(len(train_set[i][1]) for i in b) for b in batches]
    del run, base  # our GPT is only needed for the data; its weights would count in HF's memory
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(spec["seed"])
        model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], bias="none"))

    class Ordered(torch.utils.data.IterableDataset):
        def __iter__(self):  # our order, no shuffling by the Trainer
            return iter(train_set[i] for i in order)

    def collate(items: list[Any]) -> dict[str, torch.Tensor]:
        inputs, targets = our_collate(items)
        # shift_labels = our targets exactly, so HF's loss is the same token mean as ours
        return {"input_ids": inputs, "labels": targets, "shift_labels": targets}

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch_size"], max_steps=len(batches),
            learning_rate=spec["lr"], weight_decay=0.1, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch_fused", logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False, bf16=spec["dtype"] == "bf16", seed=spec["seed"],
            disable_tqdm=True, max_grad_norm=0.0,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=Ordered(), data_collator=collate,
                          callbacks=[Stamp()])
        if spec["same_allocator"]:
            from finetune.allocator import keep_freed_memory

            keep_freed_memory()
        load_peak = _reset_peak_rss()
        start = time.perf_counter()
        trainer.train()
    if spec["warmup"] == 0:
        stamps.insert(0, start)
    return _rate(spec, stamps, tokens, load_peak)


def run_worker(case: str, spec: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(spec["seed"])
    if case == "ours-lora":
        return worker_ours(spec, lora=True)
    if case == "ours-full":
        return worker_ours(spec, lora=False)
    if case == "hf-lora":
        return worker_hf(spec, lora=True)
    if case == "hf-full":
        return worker_hf(spec, lora=False)
    raise ValueError(f"unknown bench case {case!r}; choose from {', '.join(CASES)}")


# ------------------------------------------------------------------------------------------------ driver


def run(args: BenchArgs) -> dict[str, list[dict[str, Any]]]:
    """Run every case ``args.rounds`` times, each run in a subprocess of its own; returns each case's runs in round
    order. Round ``r`` starts at case ``r`` of the list, so no case always runs first or last."""
    from weights import hf, store

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown --cases {unknown}; choose from {', '.join(CASES)}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    spec: dict[str, Any] = asdict(args)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        if any(c.startswith("hf-") for c in cases):
            manifest, state = store.read(args.model, args.models_dir)
            spec["hf_dir"] = str(hf.write(Path(tmp) / "hf", manifest, state))
            del state
        for r in range(args.rounds):
            for case in cases[r % len(cases):] + cases[:r % len(cases)]:
                proc = subprocess.run([sys.executable, "-m", "finetune.bench", "--worker", case, json.dumps(spec)],
                                      capture_output=True, text=True,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode != 0:
                    raise RuntimeError(f"bench case {case} failed:\n{proc.stderr[-4000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results[case].append({"round": r, **result})
                log.info("round %d %s: %.1f tokens/s", r + 1, case, result["tokens_per_s"])
    return results


def _spread(values: list[float], fmt: str) -> str:
    """``median (min-max)``, or the value alone for one round."""
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _ratios(results: dict[str, list[dict[str, Any]]], a: str, b: str, key: str) -> list[float]:
    """``a / b`` of ``key`` within each round (cases of one round ran minutes apart, on the same machine state)."""
    return [x[key] / y[key] for x, y in zip(results[a], results[b], strict=True)]


def report(results: dict[str, list[dict[str, Any]]], args: BenchArgs) -> str:
    rounds = len(next(iter(results.values()), []))
    lines = [f"model {args.model}, {args.format} data, batch {args.batch_size}, {args.steps} timed steps after "
             f"{args.warmup} warmup, {args.dtype}, LoRA r={args.rank} alpha={args.alpha:g}, "
             f"{torch.get_num_threads()} threads, {rounds} round(s): median (min-max)",
             f"allocator: ours keeps freed memory (finetune.allocator); HF "
             f"{'the same' if args.same_allocator else 'glibc default (--same-allocator to give it ours)'}", "",
             f"{'case':<10} {'tokens/s':>22} {'train peak RSS MiB':>20} {'process peak MiB':>18}"]
    for case, runs in results.items():
        lines.append(f"{case:<10} {_spread([r['tokens_per_s'] for r in runs], '.1f'):>22} "
                     f"{_spread([r['train_peak_rss_mib'] for r in runs], '.0f'):>20} "
                     f"{_spread([r['peak_rss_mib'] for r in runs], '.0f'):>18}")
    lines.append("")
    if "ours-lora" in results and "hf-lora" in results:
        ratio = _ratios(results, "ours-lora", "hf-lora", "tokens_per_s")
        lines.append(f"LoRA, ours vs HF Trainer + peft: {_spread(ratio, '.2f')}x (target >= 1.0x)")
    if "ours-lora" in results and "ours-full" in results:
        ratio = _ratios(results, "ours-lora", "ours-full", "tokens_per_s")
        mem = _ratios(results, "ours-lora", "ours-full", "train_peak_rss_mib")
        lines.append(f"ours, LoRA vs full SFT: {_spread(ratio, '.2f')}x tokens/s (target >= 1.25x), training peak "
                     f"memory {_spread(mem, '.2f')}x")
    if "hf-lora" in results and "hf-full" in results:
        ratio = _ratios(results, "hf-lora", "hf-full", "tokens_per_s")
        lines.append(f"HF, LoRA vs full: {_spread(ratio, '.2f')}x tokens/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(run_worker(argv[1], json.loads(argv[2]))))
        return 0
    from finetune.args import args_from_namespace, build_parser

    parser = build_parser(BenchArgs, "python -m finetune bench",
                          "Training tokens/s: ours vs HF Trainer + peft, and LoRA vs full SFT, on the same batches.")
    args = args_from_namespace(BenchArgs, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one progress line per case run, on stderr
    results = run(args)
    print(report(results, args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": asdict(args), "results": results}, indent=2) + "\n",
                                       encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
