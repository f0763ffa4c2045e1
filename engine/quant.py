"""Int8 weight-only quantization for batch-1 decode (``SCRATCHCHAT_QUANT=int8``), bf16 serving only.

At batch 1 a decode step reads every weight once per token, and on this CPU PyTorch's bf16 GEMV streams a small
matrix at roughly half the memory bandwidth. Reading int8 instead halves the bytes: ``aten._weight_int8pack_mm``
(PyTorch's weight-only int8 kernel, the one gpt-fast uses on CPU) takes bf16 activations, an int8 (N, K) weight
and one scale per output channel, and accumulates in float32. That kernel is only fast for one row; for prefill
and batched decode the ordinary bf16 GEMM is much faster, so both must compute the same model:

- Each projection's scales are powers of two, so ``q * scale`` is exactly representable in bf16 (|q| <= 127
  needs 7 bits, bf16 has 8). The bf16 weight is replaced by that product ("fake quantization") and the int8 copy
  is kept next to it: one row runs ``x @ q.T * scale`` in int8, many rows run ``x @ (q * scale).T`` in bf16, and
  both are the same weights; only the summation order differs, as it already does between our GEMV and GEMM.
  A power-of-two scale costs at most one bit of the int8 range (per-channel absmax, Jacob et al. 2018).
- The head stays bf16: it is one large matrix, which the bf16 GEMV already streams at full bandwidth (the int8
  kernel measured slower there), and tied to the embedding table.

LoRA adapters still apply on top (their products run in float32), and a merge or unmerge changes the bf16
weights, so the registry calls :func:`quantize_int8_` again afterwards (idempotent on already-quantized weights).
"""

from __future__ import annotations

import os

import torch
from torch import nn

QUANT_MODES = ("none", "int8")
Int8Weight = tuple[torch.Tensor, torch.Tensor]  # (q (N, K) int8, scale (N,) in the activations' dtype)


def default_quant() -> str:
    """``$SCRATCHCHAT_QUANT`` (``none`` | ``int8``), default ``none``."""
    want = os.environ.get("SCRATCHCHAT_QUANT", "none").lower()
    if want not in QUANT_MODES:
        raise ValueError(f"SCRATCHCHAT_QUANT={want!r}; use one of {list(QUANT_MODES)}")
    return want


def quantize_rows(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of an (N, K) weight: ``weight ~= q * scale[:, None]``, |q| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (N,)
    scale = torch.exp2(torch.ceil(torch.log2(scale)))  # the smallest power of two that fits amax in 127 steps
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(weight.dtype)


def int8_linear(x: torch.Tensor, w8: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale).T (+ bias)`` for x (..., K) in the scales' dtype, through PyTorch's int8 weight-only kernel."""
    q, scale = w8
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scale)  # (rows, N)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], q.shape[0])


def _block_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for name, m in model.named_modules() if name.startswith("blocks.") and type(m) is nn.Linear]


def quantize_int8_(model: nn.Module) -> int:
    """Quantize ``model``'s block projections in place (fake-quantized bf16 weights + int8 copies). Returns the
    bytes of int8 weights. Safe to call again after a LoRA merge or unmerge: weights already on the grid quantize to
    themselves.

    Raises:
        ValueError: if the model is not bf16 (the int8 kernel is slow with float32 activations on CPU).
    """
    dtype = model.tok_emb.weight.dtype
    if dtype != torch.bfloat16:
        raise ValueError(f"int8 weight-only quantization serves bf16 models; this one is {dtype} "
                         "(set SCRATCHCHAT_DTYPE=bf16 or SCRATCHCHAT_QUANT=none)")
    nbytes = 0
    with torch.no_grad():
        for lin in _block_linears(model):
            q, scale = quantize_rows(lin.weight)
            lin.weight.copy_(q.to(dtype) * scale[:, None])  # exact: |q| <= 127 times a power of two
            lin.int8 = (q, scale)
            nbytes += q.numel()
    model.quant = "int8"
    return nbytes


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant", "none") == "int8"
