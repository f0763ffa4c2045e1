"""Int8 weight-only quantization for decode (``SCRATCHCHAT_QUANT=int8``).

A decode step reads every weight once per token, so reading int8 instead of float32 (or bf16) cuts its bytes to a
quarter (a half). Each projection keeps an int8 (N, K) copy with one scale per output channel, and decode steps of
1 to a few rows multiply by it with float32 accumulation: through our AVX2 kernel (:mod:`engine.kernels`, which
takes float32 or bf16 activations), or without it through ``aten._weight_int8pack_mm`` (PyTorch's weight-only int8
kernel, the one gpt-fast uses on CPU; bf16 activations and one row only). Prefill and larger batches keep using
the ordinary float GEMM, so both must compute the same model:

- Each projection's scales are powers of two, so ``q * scale`` is exactly representable in bf16 and float32
  (|q| <= 127 needs 7 bits, bf16 has 8). The float weight is replaced by that product ("fake quantization") and
  the int8 copy is kept next to it: decode runs ``x @ q.T * scale`` in int8, prefill ``x @ (q * scale).T``, and both
  are the same weights; only the summation order differs, as it already does between our GEMV and GEMM.
  A power-of-two scale costs at most one bit of the int8 range (per-channel absmax, Jacob et al. 2018).
- With our kernel the head is quantized the same way (``model.head_int8``; a tied head's grid weights are then the
  embedding table too, so the model is still one model). Without our kernel the head stays in its float dtype
  (PyTorch's int8 kernel measured slower than the bf16 GEMV there).

LoRA adapters still apply on top (their products run in float32), and a merge or unmerge changes the float
weights, so the registry calls :func:`quantize_int8_` again afterwards (idempotent on already-quantized weights).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from engine import kernels

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


MAX_ROWS = 8  # our int8 kernel serves decode steps of up to this many rows (the scheduler's batch)


def int8_rows() -> int:
    """How many rows an int8 product may have: :data:`MAX_ROWS` with our kernel, one with PyTorch's."""
    return MAX_ROWS if kernels.available() else 1


def int8_linear(x: torch.Tensor, w8: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale).T (+ bias)`` for x (..., K): our kernel (float32 or bf16 x), else PyTorch's int8
    weight-only kernel (x in the scales' dtype, bf16)."""
    q, scale = w8
    if kernels.available():
        return kernels.linear_i8(x, q, scale, bias)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scale)  # (rows, N)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], q.shape[0])


def _block_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for name, m in model.named_modules() if name.startswith("blocks.") and type(m) is nn.Linear]


def quantize_int8_(model: nn.Module) -> int:
    """Quantize ``model``'s block projections in place (fake-quantized float weights + int8 copies) and, with our
    kernel, the head too. Returns the bytes of int8 weights. Safe to call again after a LoRA merge or
    unmerge: weights already on the grid quantize to themselves.

    Raises:
        ValueError: if the model is float32 and our kernel is unavailable (PyTorch's int8 kernel takes bf16).
    """
    dtype = model.tok_emb.weight.dtype
    if not quant_supported(dtype):
        raise ValueError(f"int8 weight-only quantization of a {dtype} model needs our AVX2 kernels "
                         "(engine.kernels), which are unavailable here; serve bf16 (SCRATCHCHAT_DTYPE=bf16) or set "
                         "SCRATCHCHAT_QUANT=none")
    nbytes = 0
    with torch.no_grad():
        for lin in _block_linears(model):
            q, scale = quantize_rows(lin.weight)
            lin.weight.copy_(q.to(dtype) * scale[:, None])  # exact: |q| <= 127 times a power of two
            lin.int8 = (q, scale)
            nbytes += q.numel()
        if kernels.available():
            head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
            q, scale = quantize_rows(head)
            head.copy_(q.to(dtype) * scale[:, None])
            model.__dict__["head_int8"] = (q, scale)
            nbytes += q.numel()
    model.quant = "int8"
    return nbytes


def quant_supported(dtype: torch.dtype) -> bool:
    """bf16 always (PyTorch's kernel), float32 with our kernel."""
    return dtype == torch.bfloat16 or (dtype == torch.float32 and kernels.available())


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant", "none") == "int8"
