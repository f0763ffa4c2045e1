"""Our AVX2 decode kernels (``engine/csrc/kernels.cpp``), compiled on first use and cached.

PyTorch's CPU GEMV streams a decode step's weights well below the memory bandwidth on AVX2 machines, its GEMM is
slow at 2-128 rows there, and its int8 weight-only kernel wants bf16 activations, which such a CPU converts in
software. ``kernels.cpp`` registers PyTorch ops (``torch.ops.scratchchat.*``) threaded with PyTorch's own OpenMP
runtime:

- products for a few rows: ``linear`` (float32 / bf16 weights as stored), ``linear_i8`` (int8 weights, per-row
  scales) and ``linear_panel`` (a panel copy of the weight, :func:`pack_panels`: the broadcast-form GEMM
  micro-kernel, float32 / bf16 / int8, 1 to 128 rows), each with bias, scale and residual-add epilogues; on CPUs
  with AVX512-BF16, ``linear_dpbf16`` (bf16 x and a :func:`pack_dpbf16` copy: pairs of bf16 products per
  ``vdpbf16ps``, compiled per function for AVX-512 and checked for at run time); on CPUs with AVX512-VNNI,
  ``linear_dpi8`` (bf16 x and a :func:`pack_dpi8` copy of an int8 weight: quads of int8 products per ``vpdpbusd``
  against x quantized per row to 16 bits in two byte limbs, exact integer sums, the scales in the epilogue);
- ``prefix_attention``: a prefill chunk's queries over the cached keys before and with them (float32 math; for a
  bf16 chunk on AVX512-BF16 CPUs both products through ``vdpbf16ps``, the softmax weights rounded to bf16 for the
  values' product as PyTorch's SDPA rounds them);
- the small steps of a decode layer: ``decode_attention`` (RoPE, cache write, grouped-query attention),
  ``rms_norm``, ``layer_norm``, ``silu_mul``;
- ``lora``: a decode step's per-row LoRA deltas, each row computing only its own adapter's pieces;
- ``refine_top`` (a bf16 head's top logits recomputed in float32) and ``argmax`` (greedy picks, as torch.argmax);
- ``copy_positions``: cached positions of one row into another cache's row, every layer in one parallel region;
- ``decode_blocks``: every block of a decode step in one call, and ``decode_step``: the embedding, every block, the
  final norm and the head (what :mod:`engine.decode` runs).

:mod:`engine.prepack` measures the products against PyTorch's kernels at load and uses them where they win.

The library is built with ``torch.utils.cpp_extension`` (gcc + ninja, ~30 s once) into
``$SCRATCHCHAT_KERNEL_CACHE`` (default ``~/.cache/scratchchat/kernels``), keyed by the source's hash and the torch
version, so later loads take milliseconds. ``scripts/bootstrap.sh`` builds it ahead of time. Without AVX2/FMA, a
compiler, or with ``SCRATCHCHAT_KERNELS=off``, :func:`available` is False and the engine decodes with PyTorch's
kernels only (a warning says why).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "scratchchat" / "kernels"
    base = Path(os.environ.get("SCRATCHCHAT_KERNEL_CACHE", default))
    return base / f"torch-{torch.__version__.replace('+', '-')}"


def cpu_supported() -> bool:
    """AVX2 and FMA, the instruction sets the kernels are compiled for."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def available() -> bool:
    """Build (once per source version) and load the kernels; False, with the reason logged, where they cannot run."""
    if os.environ.get("SCRATCHCHAT_KERNELS", "auto").lower() == "off":
        return False
    if not cpu_supported():
        logger.info("scratchchat kernels need AVX2+FMA; this CPU reports %s", torch.backends.cpu.get_cpu_capability())
        return False
    try:
        from torch.utils import cpp_extension

        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name="scratchchat_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                           verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: decode with PyTorch's kernels
        logger.warning("scratchchat kernels unavailable, decoding with PyTorch's kernels only: %s", e)
        return False
    return hasattr(torch.ops.scratchchat, "linear")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x (..., K) float32/bf16 and a float32/bf16 weight; output in x's dtype, or
    with a float32 ``residual`` of the output's shape, ``residual + that`` in float32 (added in the kernel)."""
    res = None if residual is None else residual.reshape(-1, weight.shape[0])
    y = torch.ops.scratchchat.linear(x.reshape(-1, x.shape[-1]), weight, bias, res)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_i8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T (+ bias)`` for an int8 (N, K) weight ``q`` with one scale per output row."""
    y = torch.ops.scratchchat.linear_i8(x.reshape(-1, x.shape[-1]), q, scale, bias)
    return y.view(*x.shape[:-1], q.shape[0])


PANEL = 8  # output features per panel of a panel-packed weight


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """The (P, K, 8) panel copy of an (N, K) weight for :func:`linear_panel`: panel p holds output features
    8p..8p+7 for every k (zeros past N), so each k step of the product reads 8 contiguous features."""
    n, k = weight.shape
    p = -(-n // PANEL)
    padded = weight.detach().new_zeros(p * PANEL, k)
    padded[:n] = weight.detach()
    return padded.view(p, PANEL, k).transpose(1, 2).contiguous()


DP_GROUP = 64  # output features per group of a dot-product panel copy (four panels of 16, one AVX-512 register each)


def has_avx512_bf16() -> bool:
    """Whether this CPU runs :func:`linear_dpbf16` (AVX512-BF16's ``vdpbf16ps``; the kernels must be available)."""
    return bool(torch.ops.scratchchat.has_avx512_bf16())


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles, on which PyTorch's bf16 GEMM and SDPA (oneDNN) multiply: where it does, our
    AVX-512 kernels serve decode steps only, not prefill (not measured against AMX: no such machine at hand)."""
    return bool(torch.cpu._is_amx_tile_supported())


def pack_dpbf16(weight: torch.Tensor) -> torch.Tensor:
    """The (G, K2, 64, 2) bf16 copy of an (N, K) bf16 weight for :func:`linear_dpbf16`: group g holds output
    features 64g..64g+63, and for each pair of k the two weights of every feature side by side (16 features are
    what one ``vdpbf16ps`` multiplies by a row's broadcast x pair), so the kernel reads a group as one sequential
    stream; zeros past N and, for an odd K, past K."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"bf16 dot-product panels are for bfloat16 weights, not {weight.dtype}")
    return _pack_pairs(weight)


def has_avx512_vnni() -> bool:
    """Whether this CPU runs :func:`linear_dpi8` (AVX512-VNNI's ``vpdpbusd``; the kernels must be available)."""
    return bool(torch.ops.scratchchat.has_avx512_vnni())


def pack_dpi8(q: torch.Tensor) -> torch.Tensor:
    """The (G, K4, 64, 4) uint8 copy of an (N, K) int8 weight (engine.quant's) for :func:`linear_dpi8`: group g
    holds output features 64g..64g+63, and for each quad of k the four weights of every feature side by side (16
    features are what one ``vpdpbusd`` multiplies by a row's broadcast four bytes), each stored as ``w + 128``;
    zero weights (128) past N and K."""
    if q.dtype != torch.int8:
        raise ValueError(f"int8 dot-product panels are for int8 weights, not {q.dtype}")
    n, k = q.shape
    g, k4 = -(-n // DP_GROUP), -(-k // 4)
    padded = q.detach().new_zeros(g * DP_GROUP, 4 * k4)
    padded[:n, :k] = q.detach()
    offset = padded.view(torch.uint8) ^ 0x80  # w + 128 as an unsigned byte
    return offset.view(g, DP_GROUP, k4, 4).transpose(1, 2).contiguous()


def _pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    g, k2 = -(-n // DP_GROUP), -(-k // 2)
    padded = weight.detach().new_zeros(g * DP_GROUP, 2 * k2)
    padded[:n, :k] = weight.detach()
    return padded.view(g, DP_GROUP, k2, 2).transpose(1, 2).contiguous()


def linear_dpbf16(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for bf16 x (..., K) through :func:`pack_dpbf16`'s copy, float32 accumulation;
    output and ``residual`` as :func:`linear`. Needs :func:`has_avx512_bf16`."""
    res = None if residual is None else residual.reshape(-1, n)
    y = torch.ops.scratchchat.linear_dpbf16(x.reshape(-1, x.shape[-1]), panels, n, bias, res)
    return y.view(*x.shape[:-1], n)


def linear_dpi8(x: torch.Tensor, panels: torch.Tensor, n: int, scale: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ q.T) * scale (+ bias)`` for bf16 x (..., K) through :func:`pack_dpi8`'s copy of an int8 weight ``q``:
    each row of x is quantized to 16-bit integers (step ``max|x| / 32639``, split into two byte limbs), the sums are
    exact integers, then scaled in float32. So a row's result does not depend on the other rows, and differs from
    the float product only by that quantization (at most ``max|x| / 65278`` per entry of x). Output and
    ``residual`` as :func:`linear`. Needs :func:`has_avx512_vnni`."""
    res = None if residual is None else residual.reshape(-1, n)
    y = torch.ops.scratchchat.linear_dpi8(x.reshape(-1, x.shape[-1]), panels, n, scale, bias, res)
    return y.view(*x.shape[:-1], n)


def linear_panel(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` through the weight's panel copy (:func:`pack_panels`; float32, bf16, or int8 with
    its per-feature ``scale``) for x (..., K); ``n`` is the weight's N. Output and ``residual`` as :func:`linear`."""
    res = None if residual is None else residual.reshape(-1, n)
    y = torch.ops.scratchchat.linear_panel(x.reshape(-1, x.shape[-1]), panels, n, scale, bias, res)
    return y.view(*x.shape[:-1], n)


def main() -> int:
    """``python -m engine.kernels``: build now (bootstrap runs this so the first chat does not wait)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = available()
    print(f"scratchchat kernels: {'ready' if ok else 'unavailable (PyTorch kernels only)'} ({cache_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
