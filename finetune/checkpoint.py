"""Resumable checkpoints: the trainable weights (safetensors), the optimizer, the loop state and every RNG (torch,
Python, numpy, CUDA) written atomically into ``<run_dir>/checkpoint/`` (temp dir + rename, so an interrupted write
never leaves half a checkpoint), and read back for ``--resume``. The RNG state is stored as tensors so the file
loads with ``torch.load(weights_only=True)``. :func:`check_resume_args` refuses a resume whose options would change
the run (anything outside :data:`RESUMABLE_CHANGES`), and :func:`write_json_atomic` is the atomic JSON write the
metrics and evaluation outputs share.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_DIRNAME = "checkpoint"
# Options that may differ on --resume (everything else, LoRA rank/alpha/targets included, must match the checkpoint).
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "max_steps", "eval_every", "eval_iter", "save_every",
                               "sample_tokens", "run_dir", "models_dir", "device", "threads", "progress",
                               "overwrite", "grad_accum", "dtype", "save_dtype"})


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


def check_resume_args(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise ValueError when an option outside :data:`RESUMABLE_CHANGES` differs from the checkpoint's."""
    mismatched = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if mismatched:
        raise ValueError(f"--resume with different options than the checkpoint (saved, now): {mismatched}")


def write_json_atomic(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``path`` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
