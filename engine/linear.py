"""The decode fast path of the model's linear layers: GEMV for one row, fused projections, int8 and packed copies.

At batch 1 a decode step is memory-bound on the weights and, in Python, bound by the number of ops. So when grad is
off, one-row inputs use ``addmv`` (a GEMV; oneDNN's bf16 GEMM is slow at M=1 on CPU), or the int8 copy of a weight
(``SCRATCHCHAT_QUANT=int8``, :mod:`engine.quant`), and decode steps of one to eight rows use a packed copy where the
registry measured that faster (:mod:`engine.prepack`). Frozen q/k/v (and gate/up) projections run as one matmul
over a concatenated weight that the separate Linear weights are views into (:class:`FusedLinears`: nothing is stored
twice). A low-precision head gets its top logits recomputed in float32 (:func:`refine_top_logits`). With grad on
(training) every function here is plain ``F.linear``, and a peft-wrapped projection always runs its own module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.prepack import PackedWeight, packed_linear
from engine.quant import Int8Weight, int8_linear, int8_rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that runs a single row (decode at batch 1) as a GEMV when grad is off: ``addmv`` reads the weight
    at close to memory bandwidth, where oneDNN's bf16 GEMM with M=1 was measured 1.5-2x slower on this CPU."""
    if x.numel() != x.shape[-1] or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    flat = x.reshape(-1)
    y = torch.mv(weight, flat) if bias is None else torch.addmv(bias, weight, flat)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_q(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w8: Int8Weight | None,
             packed: PackedWeight | None = None, sources: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """:func:`linear`, or for a decode step with an int8 copy of ``weight`` (see :mod:`engine.quant`) the int8
    weight-only kernel, which reads a quarter (float32) or half (bf16) of the bytes; or, for the row counts a packed
    copy (:mod:`engine.prepack`) serves while it is still fresh for ``sources`` (default ``weight``), that kernel."""
    if not torch.is_grad_enabled():
        rows = x.numel() // x.shape[-1]
        pw = None if packed is None else packed.for_rows(rows)
        if pw is not None and (w8 is None or pw.scale is not None) and pw.fresh(sources or (weight,)):
            return packed_linear(x, pw, bias)  # a packed copy (int8 panels for an int8 weight)
        if w8 is not None and rows <= int8_rows():
            return int8_linear(x, w8, bias)
    return linear(x, weight, bias)


def is_plain_linear(module: nn.Module) -> bool:
    # peft (or anything else) may wrap a projection; then the module itself must run
    return type(module) is nn.Linear


def apply_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, with plain Linear layers going through :func:`linear` (GEMV for one row) when grad is off."""
    if is_plain_linear(module) and not torch.is_grad_enabled():
        d = module.__dict__
        return linear_q(x, module.weight, module.bias, d.get("int8"), d.get("packed"))
    return module(x)


class FusedLinears:
    """One weight (and bias) for several frozen Linear layers that read the same input (q/k/v, gate/up).

    Built on first use from a model whose projections are frozen (the registry serves models so): the weights are
    concatenated once and each Linear's ``.data`` becomes a view into the result, so nothing is stored twice, the
    state dict is unchanged, and an in-place change of one projection (``load_state_dict``, a LoRA merge or unmerge)
    writes straight into the fused weight. If a parameter is replaced (``model.to(dtype)``), the data pointers
    change and the fusion is redone. Trainable projections are never fused: the fused weight would be a second
    copy that every optimizer step makes stale.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        self.linears = tuple(linears)
        self.sizes = [lin.out_features for lin in linears]
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._int8_parts: list[Int8Weight] | None = None
        self._int8: Int8Weight | None = None
        self.packed: PackedWeight | None = None  # set by engine.prepack

    @staticmethod
    def usable(linears: Sequence[nn.Module]) -> bool:
        """Plain, frozen Linear layers with the same bias setting (peft-wrapped ones must run themselves)."""
        for m in linears:
            if not is_plain_linear(m) or m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad):
                return False
        return len({m.bias is None for m in linears}) == 1

    def _key(self) -> tuple:
        return tuple((p.data_ptr(), p.dtype) for lin in self.linears for p in (lin.weight, lin.bias) if p is not None)

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused (sum(out), in) weight and (sum(out),) bias or None."""
        if self._key() != self.key:
            self._build()
        return self.weight, self.bias

    def sources(self) -> list[torch.Tensor]:
        return [lin.weight for lin in self.linears]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The projections of ``x`` concatenated on the last dim, through the fastest kernel for its rows."""
        return linear_q(x, *self.get(), self.int8(), self.packed, self.sources())

    def int8(self) -> Int8Weight | None:
        """The projections' int8 copies (:mod:`engine.quant`) concatenated like the weight, or None."""
        parts = [lin.__dict__.get("int8") for lin in self.linears]
        if any(p is None for p in parts):
            return None
        # the parts themselves are the key (held, so compared by identity: a requantization makes new ones)
        if self._int8_parts is None or any(p is not k for p, k in zip(parts, self._int8_parts, strict=True)):
            self._int8 = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            self._int8_parts = parts
        return self._int8

    def _build(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            groups = [[lin.weight for lin in self.linears]]
            if self.linears[0].bias is not None:
                groups.append([lin.bias for lin in self.linears])
            fused = [torch.cat([p.detach() for p in group], dim=0) for group in groups]
            for group, whole in zip(groups, fused, strict=True):
                for p, part in zip(group, whole.split(self.sizes, dim=0), strict=True):
                    p.data = part  # share storage: one copy of the weights
        self.weight = fused[0]
        self.bias = fused[1] if len(fused) > 1 else None
        self.key = self._key()


def refine_top_logits(logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, k: int = 8) -> torch.Tensor:
    """float32 logits whose ``k`` largest entries are recomputed in float32 from the same (low-precision) inputs.

    A bf16 head rounds logits near 25 to steps of 0.125, so the top two candidates can tie exactly and greedy
    decoding then follows the rounding (SmolLM2 answered "L'Étoile..." instead of "The capital of France is
    Paris." on such a tie). Recomputing only the top-k keeps the head's bandwidth at bf16.
    """
    if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and kernels.available():
        # one op (engine.kernels) in place of the five below: 0.4-0.5 ms of a ~10 ms decode step on a 2-core EPYC
        flat = torch.ops.scratchchat.refine_top(logits.reshape(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]),
                                                weight, k)
        return flat.view(logits.shape)
    logits = logits.float()
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (..., k)
    exact = torch.einsum("...d,...kd->...k", x.float(), weight[top].float())
    return logits.scatter_(-1, top, exact)
