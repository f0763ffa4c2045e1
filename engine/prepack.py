"""Prepacked weights for batch-1 decode, chosen per projection kind by measuring when a model is loaded.

At batch 1 a decode step is one GEMV per projection, and which library kernel streams a weight fastest depends on
the CPU, the dtype and the shape. On a 2-core AMD EPYC (AVX2, no AVX-512) PyTorch's float32 ``addmv`` (MKL) ran
single-threaded at 10-16 GB/s, while the same product through a weight that MKL or oneDNN had packed for one row
reached 16-28 GB/s for the wide matrices (fused q/k/v, fused gate/up, the 49k-row head) and was slower for the
tall ones (``down_proj``). Inductor's CPU backend uses the same two packed kernels (``mkl._mkl_linear``,
``mkldnn._linear_pointwise``) for frozen float32 linears.

So :func:`prepack_` times each kind of projection (every layer's weights of that kind in turn, so they stream from
memory as in a real step) with the plain kernel and with each packed kernel this build and CPU offer, and keeps a
packed copy only where it was faster. A packed copy is a second copy of that weight: more memory for more speed,
which ``SCRATCHCHAT_PACK=off`` declines. The plain weight stays the reference: prefill and batched decode use it,
and a packed copy whose weight changed since packing (a LoRA merge writes in place) is ignored until the registry
packs again, so a stale copy can cost speed but never correctness.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

PACK_MODES = ("auto", "off", "mkl", "onednn")  # the last two force one kernel wherever it runs
MIN_GAIN = 1.05  # a packed kernel must be this much faster than the plain one to be worth its memory


def default_pack() -> str:
    """``$SCRATCHCHAT_PACK`` (``auto`` | ``off`` | ``mkl`` | ``onednn``), default ``auto``."""
    want = os.environ.get("SCRATCHCHAT_PACK", "auto").lower()
    if want not in PACK_MODES:
        raise ValueError(f"SCRATCHCHAT_PACK={want!r}; use one of {list(PACK_MODES)}")
    return want


@dataclass(frozen=True)
class PackedWeight:
    """A weight packed for one-row products by ``kernel`` (``"mkl"`` | ``"onednn"``), valid while ``key`` holds."""

    kernel: str
    packed: torch.Tensor
    weight: torch.Tensor  # the plain weight it was packed from (MKL's kernel wants it too)
    key: tuple

    def fresh(self, sources: Sequence[torch.Tensor]) -> bool:
        """True while the source weights are the same tensors, unchanged since packing."""
        return self.key == source_key(sources)


@dataclass
class Target:
    """One product of a decode step: its kind, where its packed copy goes, and the weights it reads."""

    kind: str
    put: Callable[[PackedWeight | None], None]
    sources: list[torch.Tensor]  # the parameters the (possibly fused) weight is made of
    weight: torch.Tensor
    bias: torch.Tensor | None
    quantized: bool


def source_key(sources: Sequence[torch.Tensor]) -> tuple:
    """Identity and in-place version of the weights a packed copy was made from."""
    return tuple((t.data_ptr(), t._version) for t in sources)


def _pack_mkl(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(w, 1)


def _pack_onednn(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


PACKERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mkl": _pack_mkl, "onednn": _pack_onednn}


def packed_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for one row ``x`` (..., K) through the packed copy."""
    flat = x.reshape(1, x.shape[-1])
    if pw.kernel == "mkl":
        y = torch.ops.mkl._mkl_linear(flat, pw.packed, pw.weight, bias, 1)
    else:
        y = torch.ops.mkldnn._linear_pointwise(flat, pw.packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], pw.weight.shape[0])


def _plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0])


def _seconds(run: Callable[[int], object], n: int, reps: int = 3) -> float:
    run(0)  # warm up (first-call setup, page faults of fresh buffers)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(n):
            run(i)
        best = min(best, time.perf_counter() - t)
    return best


def choose(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
           kernels: Sequence[str] = tuple(PACKERS)) -> tuple[str, list[torch.Tensor] | None, dict[str, float]]:
    """Time the plain GEMV and each packed kernel over ``weights`` (one kind of projection, every layer).

    Returns:
        (the fastest kernel's name or ``"plain"``, its packed weights or None, seconds per pass for each kernel).
    """
    gen = torch.Generator().manual_seed(0)  # never the global RNG: loading a model must not move seeded sampling
    x = torch.randn(1, weights[0].shape[1], generator=gen).to(weights[0].dtype)
    forced = len(kernels) == 1
    times = {} if forced else {"plain": _seconds(lambda i: _plain(x, weights[i], biases[i]), len(weights))}
    best, best_packed = "plain", None
    for kernel in kernels:
        try:
            packed = [PACKERS[kernel](w) for w in weights]
            pws = [PackedWeight(kernel, p, w, ()) for p, w in zip(packed, weights, strict=True)]
            packed_linear(x, pws[0], biases[0])
        except (RuntimeError, AttributeError, NotImplementedError) as e:  # not in this build or on this CPU
            logger.debug("packed kernel %s unavailable: %s", kernel, e)
            continue
        if forced:
            return kernel, packed, times
        times[kernel] = _seconds(lambda i, pws=pws: packed_linear(x, pws[i], biases[i]), len(weights))
        if times[kernel] * MIN_GAIN < times[best] and (best == "plain" or times[kernel] < times[best]):
            best, best_packed = kernel, packed
    return best, best_packed, times


def _setter(obj: object, attr: str) -> Callable[[PackedWeight | None], None]:
    def put(value: PackedWeight | None) -> None:
        obj.__dict__[attr] = value  # a plain attribute, even on an nn.Module (never a buffer or state)
    return put


def decode_weights(model: nn.Module) -> Iterator[Target]:
    """Every product a batch-1 decode step of our GPT runs, as :class:`Target` s (fused ones as one)."""
    def linear(kind: str, lin: nn.Module) -> Target:
        return Target(kind, _setter(lin, "packed"), [lin.weight], lin.weight, lin.bias,
                      lin.__dict__.get("int8") is not None)

    def fused(kind: str, f: object) -> Target:
        weight, bias = f.get()
        return Target(kind, _setter(f, "packed"), f.sources(), weight, bias, f.int8() is not None)

    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        qkv = attn._fused_qkv()
        if qkv is not None:
            yield fused("qkv", qkv)
        else:
            yield from (linear(n, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
        yield linear("o_proj", attn.o_proj)
        gate_up = mlp._fused_gate_up() if mlp.swiglu else None
        if gate_up is not None:
            yield fused("gate_up", gate_up)
        else:
            yield from (linear(n, getattr(mlp, n)) for n in ("gate_proj", "up_proj") if hasattr(mlp, n))
        yield linear("down_proj", mlp.down_proj)
    if model.lm_head is not None:
        yield linear("head", model.lm_head)
    else:
        w = model.tok_emb.weight
        yield Target("head", _setter(model, "head_packed"), [w], w, None, False)


@torch.no_grad()
def prepack_(model: nn.Module, mode: str = "auto") -> dict[str, str]:
    """Measure and attach packed copies to ``model``'s frozen projections and head where they decode faster.

    Args:
        mode: ``"auto"`` measures; ``"mkl"`` or ``"onednn"`` packs every weight that kernel takes without
            measuring; ``"off"`` removes packed copies.

    Projections of one kind (``qkv``, ``o_proj``, ``gate_up``, ``down_proj``, ``head``, ...) share the decision.
    Safe to call again (after a LoRA merge or unmerge): every kind is measured and packed afresh.

    Returns:
        the kernel chosen for each kind (``"plain"`` where nothing beat the plain GEMV, ``"int8"`` where the
        int8 copies of :mod:`engine.quant` serve).
    """
    if mode not in PACK_MODES:
        raise ValueError(f"pack mode must be one of {list(PACK_MODES)}, got {mode!r}")
    kinds: dict[str, list[Target]] = {}
    for target in decode_weights(model):
        target.put(None)
        kinds.setdefault(target.kind, []).append(target)
    chosen: dict[str, str] = {}
    extra = 0
    for kind, targets in kinds.items():
        if any(t.quantized for t in targets):
            chosen[kind] = "int8"
            continue
        if mode == "off":
            chosen[kind] = "plain"
            continue
        kernels = tuple(PACKERS) if mode == "auto" else (mode,)
        name, packed, times = choose([t.weight for t in targets], [t.bias for t in targets], kernels)
        chosen[kind] = name
        logger.debug("decode kernel for %s: %s (%s)", kind, name,
                     ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
        for t, p in zip(targets, packed or (), strict=False):
            t.put(PackedWeight(name, p, t.weight, source_key(t.sources)))
            extra += t.weight.numel() * t.weight.element_size()
    model.__dict__["decode_kernels"] = chosen
    model.__dict__["packed_bytes"] = extra
    logger.info("decode kernels: %s (%.1f MB of packed copies)",
                ", ".join(f"{k}={v}" for k, v in chosen.items()), extra / 2**20)
    return chosen
