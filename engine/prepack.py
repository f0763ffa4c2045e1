"""Prepacked weights for decode steps (1 to 8 rows) and short prefill chunks, chosen per projection kind by measuring
when a model loads.

At batch 1 a decode step is one GEMV per projection, and which library kernel streams a weight fastest depends on
the CPU, the dtype and the shape. On a 2-core AMD EPYC (AVX2, no AVX-512) PyTorch's float32 ``addmv`` (MKL) ran
single-threaded at 10-16 GB/s, while the same product through a weight that MKL or oneDNN had packed for one row
reached 16-28 GB/s for the wide matrices (fused q/k/v, fused gate/up, the 49k-row head) and was slower for the
tall ones (``down_proj``). Inductor's CPU backend uses the same two packed kernels (``mkl._mkl_linear``,
``mkldnn._linear_pointwise``) for frozen float32 linears.

Batched decode (a few rows) has the same problem: MKL's float32 GEMM at 4-8 rows read the weights at 5-8 GB/s
there, and oneDNN's kernel on a weight packed for 8 rows ran gate/up, down and the head 2-3x faster.

Our own AVX2 kernels (:mod:`engine.kernels`) are two more candidates: ``scratch`` streams the weight as stored
(25-30 GB/s for one row there, no copy), ``panel`` reads a panel copy of it (8 output features interleaved per k,
the broadcast-form GEMM micro-kernel): ~12% faster than ``scratch`` at one row there, 1.3-1.6x at 2-8 rows, and
faster than MKL's GEMM for prefill chunks up to :data:`PANEL_ROWS` rows. Where the CPU has AVX512-BF16, bf16
weights get a third, ``dpbf16`` (:func:`engine.kernels.pack_dpbf16`: ``vdpbf16ps`` on pairs of k, 32 multiply-adds
an instruction; on a 2-core Zen4 EPYC at 8 rows 1.3-1.9x faster than our AVX2 panels and 2.0-2.7x faster than
PyTorch's bf16 ``F.linear``; it serves prefill chunks up to :data:`DP_ROWS` rows too). An int8 model
(:mod:`engine.quant`) gets int8 panels (a quarter of the float copy's bytes; int8 dot-product panels where the CPU
has AVX512-BF16 and the activations are bf16) for 2 or more rows, and for one row where they beat the row-form int8
kernel at load (see :func:`_pack_int8`).

So :func:`prepack_` times each kind of projection (every layer's weights of that kind in turn, so they stream from
memory as in a real step) at one row and at :data:`BATCH_ROWS` rows, with the plain kernels (``addmv``,
``F.linear``) and each packed kernel this build and CPU offer, and picks the fastest for one row and the fastest
for 2 to :data:`BATCH_ROWS` rows, keeping at most one packed copy per weight (``scratch`` makes none). A packed copy
is a second copy of that weight: more memory for more speed, made only within the byte budget the registry passes
(what its memory cap leaves beside the weights). ``SCRATCHCHAT_PACK=off`` keeps PyTorch's plain kernels only (no
copies, none of ours); ``scratch`` or ``panel`` forces one of ours. The plain weight stays the reference (training
and long prefill chunks use it), and a packed copy whose weight changed since packing (a LoRA merge writes in place)
is ignored until the registry packs again, so a stale copy can cost speed but never correctness.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.quant import int8_linear

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64
PACK_MODES = ("auto", "off", "mkl", "onednn", "scratch", "panel", "dpbf16")  # all but the first two force a kernel
MIN_GAIN = 1.05  # a packed kernel must be this much faster than the plain one to be worth its memory
BATCH_ROWS = 8  # the batched decode size packed for and measured (the scheduler's default batch)
# Panel copies also serve prefill chunks up to this many rows: on a 2-core EPYC (AVX2) over SmolLM2's projections
# they ran 72 / 108 / 114 GFLOPS at 16 / 48 / 128 rows where MKL's GEMM ran 38 / 70 / 94, and fell behind from about
# 200 rows (256: 91 vs 112). Longer prompt chunks use the plain GEMM.
PANEL_ROWS = 128
# Dot-product panels (bf16, AVX512-BF16) serve prefill chunks up to this many rows too: SmolLM2's prefill of 51 /
# 128 / 256 / 512 tokens ran 1.22 / 1.07 / 1.00 / 0.95x as fast as through PyTorch's bf16 F.linear (oneDNN) on the
# 2-core Zen4 EPYC (a chat turn's new tokens are the 51-token case). Not where the CPU has AMX (see _prefill_rows).
DP_ROWS = 128
# Where panels or dot-product panels win one row (their copy is made anyway), they also take 2-8 rows unless another
# kernel is more than this much faster there: the 8-row figure alone misses that they serve prefill chunks too
# (above).
PREFILL_SHARE = 1.10
# Where the batches run our panels or dot-product panels (every output one chain over k whatever the row count), one
# row takes that kernel too unless our row-form kernel (``scratch``) is more than this much faster there: a request
# then computes the same bits alone and in a batch, and the choice does not flip from load to load where the two
# measure alike (SmolLM2 bf16 on a Zen4 EPYC: within ~2% in paired runs, and which one a load picked decided a greedy
# answer at a near-tie: logits 22.36 vs 22.30 at its second token). The margin is wide because one load's short
# measurement can straddle a swing of the VM's memory bandwidth: at 10% a bench load still picked ``scratch`` for
# two kinds. Dot-product panels take one row wherever they take the batches, whatever the measurement: on the Zen4
# EPYC they stream as fast as ``scratch`` from memory and run 1.5-1.6x as fast once the weights come faster (from
# cache: SmolLM2's down_proj 21 vs 34 us, q/k/v 33 vs 46 us), which the VM's fast-bandwidth spells do; loads that
# still picked ``scratch`` at 25% (gate_up, down_proj, the head) decoded SmolLM2 10% slower (median of 12 paired
# runs, 25-34% in fast spells).
SAME_KERNEL_SHARE = 1.25
# Int8 dot-product panels take one row too unless the row-form int8 kernel measures more than this much faster. With
# AVX512-VNNI (vpdpbusd on the int8 weights as stored, activations quantized to 16 bits) they ran SmolLM2's shapes
# 1.8-2.5x as fast as the earlier int8-to-bf16 panels from cache, and SmolLM2 int8 decoded at 185 tok/s with them
# for one row against 158 with the row-form kernel (median of 8 paired rounds on the Zen4 EPYC, 1.02-1.46x each).
# The margin keeps a short load-time measurement that straddles a swing of the VM's bandwidth from choosing the
# row-form kernel (it had put three GPT-2 kinds on it with the earlier panels); a CPU where it is clearly faster
# (the Zen5 EPYC was 1.2x with the earlier panels, session 11) keeps one row on it.
INT8_ROWS_SHARE = 1.15


def default_pack() -> str:
    """``$SCRATCHCHAT_PACK`` (``auto`` | ``off`` | ``mkl`` | ``onednn`` | ``scratch``), default ``auto``."""
    want = os.environ.get("SCRATCHCHAT_PACK", "auto").lower()
    if want not in PACK_MODES:
        raise ValueError(f"SCRATCHCHAT_PACK={want!r}; use one of {list(PACK_MODES)}")
    return want


@dataclass(frozen=True)
class PackedWeight:
    """A weight packed by ``kernel`` (``"mkl"`` | ``"onednn"``; ``"scratch"``: our kernels, on the weight itself),
    valid while ``key`` holds.

    It serves products of 2 to ``max_rows`` rows, and one row when ``single``; ``single_kernel`` is another
    (copy-free) choice for the one-row products where that one was faster.
    """

    kernel: str
    packed: torch.Tensor
    weight: torch.Tensor  # the plain weight it was packed from (MKL's kernel wants it too)
    key: tuple
    single: bool = True
    max_rows: int = 1
    single_kernel: PackedWeight | None = None
    scale: torch.Tensor | None = None  # int8 panels: the per-feature scale of engine.quant's copy

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a model drops its packed copies (oneDNN's opaque tensors cannot be copied); the copy
        decodes with the plain kernels until it is packed again."""
        return None

    def serves(self, rows: int) -> bool:
        return self.single if rows == 1 else rows <= self.max_rows

    def for_rows(self, rows: int) -> PackedWeight | None:
        """The copy that serves a product of ``rows`` rows, or None for the plain kernels."""
        if rows == 1 and self.single_kernel is not None:
            return self.single_kernel
        return self if self.serves(rows) else None

    @property
    def copies(self) -> bool:
        """Whether this holds a second copy of the weight (our kernels read the weight itself)."""
        return self.packed is not self.weight

    @property
    def label(self) -> str:
        if self.max_rows == 1:
            return self.kernel
        many = f"{self.kernel}[{1 if self.single else 2}-{self.max_rows} rows]"
        return many if self.single_kernel is None else f"{self.single_kernel.kernel}[1 row]+{many}"

    def fresh(self, sources: Sequence[torch.Tensor]) -> bool:
        """True while the source weights are the same tensors, unchanged since packing."""
        return self.key == source_key(sources)


class _Slot:
    """Where a product's packed copy goes: a plain attribute, even on an nn.Module (never a buffer or state)."""

    def __init__(self, obj: object, attr: str) -> None:
        self.obj, self.attr = obj, attr

    def __call__(self, value: PackedWeight | None) -> None:
        self.obj.__dict__[self.attr] = value

    def get(self) -> PackedWeight | None:
        return self.obj.__dict__.get(self.attr)


@dataclass
class Target:
    """One product of a decode step: its kind, where its packed copy goes, and the weights it reads."""

    kind: str
    put: _Slot  # put(copy) installs it, put.get() reads it back
    sources: list[torch.Tensor]  # the parameters the (possibly fused) weight is made of
    weight: torch.Tensor
    bias: torch.Tensor | None
    int8: tuple[torch.Tensor, torch.Tensor] | None  # engine.quant's (q, scale) copy, if quantized

    @property
    def quantized(self) -> bool:
        return self.int8 is not None


def source_key(sources: Sequence[torch.Tensor]) -> tuple:
    """Identity and in-place version of the weights a packed copy was made from."""
    return tuple((t.data_ptr(), t._version) for t in sources)


def _pack_mkl(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(w, 1)  # MKL's packed GEMM: one row only


def _pack_onednn(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, BATCH_ROWS)  # a layout hint; any row count works


def _pack_scratch(w: torch.Tensor) -> torch.Tensor:
    if not kernels.available():
        raise RuntimeError("scratchchat kernels unavailable")
    return w  # no copy: our kernels read the weight as stored


def _pack_panel(w: torch.Tensor) -> torch.Tensor:
    if not kernels.available():
        raise RuntimeError("scratchchat kernels unavailable")
    return kernels.pack_panels(w)


def _pack_dpbf16(w: torch.Tensor) -> torch.Tensor:
    if not kernels.available() or not kernels.has_avx512_bf16():
        raise RuntimeError("bf16 dot-product panels need our kernels on a CPU with AVX512-BF16")
    if w.dtype != torch.bfloat16:
        raise RuntimeError(f"bf16 dot-product panels are for bfloat16 weights, not {w.dtype}")
    return kernels.pack_dpbf16(w)


PACKERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mkl": _pack_mkl, "onednn": _pack_onednn, "scratch": _pack_scratch, "panel": _pack_panel,
    "dpbf16": _pack_dpbf16}
MULTI_ROW = ("onednn", "scratch", "panel", "dpbf16")  # kernels that take more than one row
OURS = ("scratch", "panel", "dpbf16")  # engine.kernels: what a one-op decode step (engine.decode) can run
# What a decode step's Python layer loop (engine.decode) costs over the one-op step, per layer: measured 50-120 us
# for SmolLM2 in bf16 on the 2-core EPYC (1.5-3.7 ms a 30-layer step), ~67 us in float32
LOOP_COST_PER_LAYER = 60e-6


def packed_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x`` (..., K) through the packed copy (MKL's: one row only)."""
    flat = x.reshape(-1, x.shape[-1])
    if pw.kernel == "scratch":
        y = torch.ops.scratchchat.linear(flat, pw.weight, bias)
    elif pw.kernel == "panel":
        y = torch.ops.scratchchat.linear_panel(flat, pw.packed, pw.weight.shape[0], pw.scale, bias)
    elif pw.kernel == "dpbf16":
        y = torch.ops.scratchchat.linear_dpbf16(flat, pw.packed, pw.weight.shape[0], bias)
    elif pw.kernel == "dpi8":
        y = torch.ops.scratchchat.linear_dpi8(flat, pw.packed, pw.weight.shape[0], pw.scale, bias)
    elif pw.kernel == "mkl":
        y = torch.ops.mkl._mkl_linear(flat, pw.packed, pw.weight, bias, 1)
    else:
        y = torch.ops.mkldnn._linear_pointwise(flat, pw.packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], pw.weight.shape[0])


def _plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0])


def _seconds(runs: dict[str, Callable[[int], object]], n: int, reps: int = 3) -> dict[str, float]:
    """Best seconds per pass (``run(0) .. run(n - 1)``) of each run, the runs interleaved pass by pass: on a shared
    machine whose speed drifts by tens of percent over seconds, a slow spell then hits every candidate alike instead
    of deciding the choice."""
    for run in runs.values():
        run(0)  # warm up (first-call setup, page faults of fresh buffers)
    reps = max(reps, 12 // n)  # a kind with one weight (the head) is a single call per pass: more passes
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, run in runs.items():
            t = time.perf_counter()
            for i in range(n):
                run(i)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def choose(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
           names: Sequence[str] = tuple(PACKERS), forced: bool = False,
           ) -> tuple[list[PackedWeight] | None, dict[str, float]]:
    """Time the plain kernels and each packed kernel over ``weights`` (one kind of projection, every layer), at one
    row and at :data:`BATCH_ROWS` rows. ``forced``: use the (one) kernel named without measuring.

    Returns:
        (the chosen packed weights (keyless; their ``label`` names the choice) or None for the plain kernels,
        seconds per pass of each kernel, keys ``"<kernel> x<rows>"``).
    """
    gen = torch.Generator().manual_seed(0)  # never the global RNG: loading a model must not move seeded sampling
    k, dtype, n = weights[0].shape[1], weights[0].dtype, len(weights)
    x1 = torch.randn(1, k, generator=gen).to(dtype)
    xb = torch.randn(BATCH_ROWS, k, generator=gen).to(dtype)
    runs: dict[str, Callable[[int], object]] = {}
    if not forced:
        runs["plain x1"] = lambda i: _plain(x1, weights[i], biases[i])
        runs[f"plain x{BATCH_ROWS}"] = lambda i: F.linear(xb, weights[i], biases[i])
    candidates: dict[str, list[PackedWeight]] = {}
    for kernel in names:
        try:
            pws = [PackedWeight(kernel, PACKERS[kernel](w), w, ()) for w in weights]
            packed_linear(x1, pws[0], biases[0])
        except (RuntimeError, AttributeError, NotImplementedError) as e:  # not in this build or on this CPU
            logger.debug("packed kernel %s unavailable: %s", kernel, e)
            continue
        candidates[kernel] = pws
        if forced:
            rows = BATCH_ROWS if kernel in MULTI_ROW else 1
            return _serving(pws, True, rows), {}
        runs[f"{kernel} x1"] = lambda i, pws=pws: packed_linear(x1, pws[i], biases[i])
        if kernel in MULTI_ROW:
            runs[f"{kernel} x{BATCH_ROWS}"] = lambda i, pws=pws: packed_linear(xb, pws[i], biases[i])
    times = _seconds(runs, n)
    return _pick(candidates, times), times


def _pack_int8(targets: list[Target], mode: str) -> tuple[str, bool]:
    """Give one kind's int8 copies (engine.quant) a packed copy for decode steps and prefill chunks up to
    :data:`PANEL_ROWS` rows: int8 dot-product panels (:func:`engine.kernels.pack_dpi8`, ``vpdpbusd``) where the CPU
    has AVX512-VNNI and the activations are bf16, else int8 panels (a quarter of the float copy's bytes either way).
    Batches and chunks always run the copy (on the AVX2 EPYC the panels ran 1.3-1.9x the row-form kernel at 2-8
    rows); one row runs it unless the row-form int8 kernel on the copy of engine.quant measures faster here, than the
    int8 panels by any margin, than the dot-product panels by more than :data:`INT8_ROWS_SHARE`. Returns (the copy's
    label, whether it serves one row too)."""
    dp = mode != "panel" and kernels.has_avx512_vnni() and all(t.weight.dtype == torch.bfloat16 for t in targets)
    name = "dpi8" if dp else "panel"
    pws = [PackedWeight(name, (kernels.pack_dpi8 if dp else kernels.pack_panels)(t.int8[0]), t.int8[0],
                        source_key(t.sources), True, PANEL_ROWS, scale=t.int8[1].float()) for t in targets]
    if mode == "auto":
        gen = torch.Generator().manual_seed(0)  # never the global RNG: loading a model must not move seeded sampling
        x1 = torch.randn(1, targets[0].int8[0].shape[1], generator=gen).to(targets[0].weight.dtype)
        times = _seconds({"packed": lambda i: packed_linear(x1, pws[i], targets[i].bias),
                          "rows": lambda i: int8_linear(x1, targets[i].int8, targets[i].bias)}, len(targets),
                         reps=8)  # two one-row runs, ~2 ms a pass: more passes, fewer choices left to one swing
        logger.debug("int8 %s at one row %.2f ms, row-form %.2f ms", name, 1e3 * times["packed"], 1e3 * times["rows"])
        if times["packed"] > (INT8_ROWS_SHARE if dp else 1.0) * times["rows"]:
            pws = [replace(p, single=False) for p in pws]
    for t, pw in zip(targets, pws, strict=True):
        t.put(pw)
    return ("dp panel" if dp else "panel"), pws[0].single


def _pick(candidates: dict[str, list[PackedWeight]], times: dict[str, float]) -> list[PackedWeight] | None:
    """The fastest kernel for 2+ rows and for one row, with at most one packed copy per weight: a kernel that makes
    a copy must beat the plain one by :data:`MIN_GAIN`, and of two copying winners only the batched one is kept.
    Where the batches run our panels, one row does too unless ``scratch`` is clearly faster
    (:data:`SAME_KERNEL_SHARE`); where they run dot-product panels, one row always does."""
    def best(rows: int, names: Sequence[str]) -> str:
        def cost(name: str) -> float:
            copies = name != "scratch"  # our kernels read the weight itself
            return times[f"{name} x{rows}"] * (MIN_GAIN if copies else 1.0)
        return min([n for n in names if f"{n} x{rows}" in times], key=cost, default="plain")

    many = best(BATCH_ROWS, ["plain", *(k for k in MULTI_ROW if k in candidates)])
    one = best(1, ["plain", *candidates])
    batch = f" x{BATCH_ROWS}"
    if one in ("panel", "dpbf16") and many != one and _prefill_rows(one) > BATCH_ROWS \
            and times[one + batch] <= PREFILL_SHARE * times[many + batch]:
        many = one  # its copy is made anyway, and it also serves prefill chunks (PANEL_ROWS, DP_ROWS)
    if one == "scratch" and (many == "dpbf16" or many == "panel" and times.get(f"{many} x1", math.inf)
                             <= SAME_KERNEL_SHARE * times["scratch x1"]):
        one = many  # the batches' kernel for one row too (see SAME_KERNEL_SHARE)
    if many == "plain" and one == "plain":
        return None
    if many == "plain":
        return _serving(candidates[one], True, 1)
    if one in (many, "plain") or (one != "scratch" and many != "scratch"):
        return _serving(candidates[many], one == many, BATCH_ROWS)
    rows = _prefill_rows(many)
    return [replace(m, single=False, max_rows=rows, single_kernel=replace(o, single=True, max_rows=1))
            for m, o in zip(candidates[many], candidates[one], strict=True)]


def _ours_for_one_row(packed: list[PackedWeight] | None, times: dict[str, float]) -> tuple[str, float] | None:
    """For a kind whose one-row products run a library kernel: the kernel of ours it could use instead without
    another copy (the panels it already has, else ``scratch`` on the weight itself) and its measured seconds per
    step; None where ours was not measured (kernels unavailable)."""
    name = packed[0].kernel if packed and packed[0].kernel in ("panel", "dpbf16") else "scratch"
    t = times.get(f"{name} x1")
    return None if t is None else (name, t)


def _keep_one_op_steps(decided: dict[str, tuple[list[PackedWeight] | None, dict[str, float], list[torch.Tensor]]],
                       layers: int) -> None:
    """Switch the kinds whose one-row choice is a library kernel to ours when the step gains more than it loses.

    A decode step runs as one op (``scratchchat::decode_blocks``) only when every block projection runs one of our
    kernels; one library kernel anywhere and the step goes through the Python layer loop, which costs about
    :data:`LOOP_COST_PER_LAYER` a layer. Each kind is measured alone, so a library GEMV a few percent faster on one
    kind can cost the whole step more than it saves (bf16 on the AVX2 EPYC: PyTorch's ``addmv`` won q/k/v and o at
    one row and the step lost 1.5-3.7 ms of ~20 to the loop). The head is outside the blocks and keeps its choice."""
    blocks = {kind: v for kind, v in decided.items() if kind != "head"}
    switch = {}
    for kind, (packed, times, _) in blocks.items():
        pw = packed[0].for_rows(1) if packed else None
        if pw is not None and pw.kernel in OURS:
            continue
        got = _ours_for_one_row(packed, times)
        if got is None:
            return  # this kind cannot run ours: the step loops anyway
        switch[kind] = got
    if not switch:
        return
    loss = sum(t - min(v for k, v in blocks[kind][1].items() if k.endswith(" x1")) for kind, (_, t) in switch.items())
    if loss >= LOOP_COST_PER_LAYER * layers:
        return
    for kind, (name, _) in switch.items():
        packed, times, weights = decided[kind]
        if packed and packed[0].kernel == name:  # the panels it has serve one row too
            packed = [replace(p, single=True, single_kernel=None) for p in packed]
        elif packed and packed[0].max_rows > 1:  # a library copy for 2+ rows, ours on the weight itself for one
            packed = [replace(p, single=False, single_kernel=PackedWeight("scratch", p.weight, p.weight, ()))
                      for p in packed]
        else:  # the plain kernels for 2+ rows (a one-row library copy is dropped)
            packed = [PackedWeight("scratch", w, w, ()) for w in weights]
        decided[kind] = packed, times, weights
        logger.debug("decode kernel for %s: %s for one row keeps the step one op", kind, name)


def _keep_one_op_batches(decided: dict[str, tuple[list[PackedWeight] | None, dict[str, float], list[torch.Tensor]]],
                         layers: int) -> None:
    """:func:`_keep_one_op_steps` for batched steps (2 to :data:`BATCH_ROWS` rows): switch the block kinds whose
    batched choice is a library kernel to the fastest of ours measured at :data:`BATCH_ROWS` rows when all of them
    together lose less than the Python layer loop costs. Applies where one row already runs ours (the others loop at
    one row anyway). On the Zen5 EPYC oneDNN won SmolLM2's gate/up at 8 rows by 0.2 ms a step over ``dpbf16``, and
    every batched step then ran the layer loop (~1.8 ms) plus a Python call per adapter piece (per-request LoRA)."""
    blocks = {kind: v for kind, v in decided.items() if kind != "head"}
    switch: dict[str, tuple[str, float]] = {}
    for kind, (packed, times, _) in blocks.items():
        one = packed[0].for_rows(1) if packed else None
        if one is None or one.kernel not in OURS:
            return  # one row loops anyway: nothing to keep
        many = packed[0].for_rows(BATCH_ROWS)
        if many is not None and many.kernel in OURS:
            continue
        # a library copy is replaced by ours (about its size); where the plain kernels ran, only ours without a copy
        names = OURS if many is not None else ("scratch",)
        ours = [(times[f"{k} x{BATCH_ROWS}"], k) for k in names if f"{k} x{BATCH_ROWS}" in times]
        if not ours:
            return
        best = min(v for k, v in times.items() if k.endswith(f" x{BATCH_ROWS}"))
        t, name = min(ours)
        switch[kind] = (name, t - best)
    if not switch or sum(loss for _, loss in switch.values()) >= LOOP_COST_PER_LAYER * layers:
        return
    for kind, (name, _) in switch.items():
        packed, times, weights = decided[kind]
        one = packed[0].for_rows(1)
        rows = _prefill_rows(name)
        if one.kernel == name:  # ours already serves one row with this copy: it takes the batches too
            new = [replace(p.for_rows(1), single=True, max_rows=rows, single_kernel=None) for p in packed]
        else:
            new = [PackedWeight(name, PACKERS[name](w), w, (), single=False, max_rows=rows,
                                single_kernel=p.for_rows(1)) for p, w in zip(packed, weights, strict=True)]
        decided[kind] = new, times, weights
        logger.debug("decode kernel for %s: %s for 2-%d rows keeps batched steps one op", kind, name, BATCH_ROWS)


def _copy_bytes(packed: list[PackedWeight] | None) -> int:
    """Bytes of the second copies a kind's choice holds (our row-form kernel reads the weight itself)."""
    copies = packed and any(p.copies or (p.single_kernel is not None and p.single_kernel.copies) for p in packed)
    return sum(p.weight.numel() * p.weight.element_size() for p in packed) if copies else 0


def _prefill_rows(kernel: str) -> int:
    """The most rows a copy for ``kernel`` serves when it serves batches: prefill chunks too for our panels
    (:data:`PANEL_ROWS`) and dot-product panels (:data:`DP_ROWS`; not on AMX CPUs, where oneDNN's bf16 GEMM runs on
    the tiles), decode batches only for the library kernels' copies."""
    if kernel == "panel":
        return PANEL_ROWS
    if kernel == "dpbf16" and not kernels.has_amx():
        return DP_ROWS
    return BATCH_ROWS


def _serving(pws: list[PackedWeight], single: bool, max_rows: int) -> list[PackedWeight]:
    if pws and max_rows > 1:
        max_rows = max(max_rows, _prefill_rows(pws[0].kernel))  # prefill chunks too (see PANEL_ROWS, DP_ROWS)
    return [replace(p, single=single, max_rows=max_rows) for p in pws]


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of ``nbytes`` in private anonymous memory advised for transparent huge pages
    (``madvise(MADV_HUGEPAGE)``: where the system's THP mode is ``madvise``, as here, plain allocations get 4 KB
    pages), starting on a 2 MB boundary; ordinary memory where the platform or kernel has no such advice. Its memory
    lives as long as any view of it."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(nbytes, dtype=torch.uint8)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(m, dtype=torch.uint8)  # holds a reference to the mapping (unmapped when freed)
    start = -whole.data_ptr() % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, start, nbytes)  # before the first touch: pages are faulted in as huge ones
    except OSError as e:  # a kernel built without transparent huge pages (EINVAL): ordinary pages, same memory
        logger.debug("no transparent huge pages for packed copies: %s", e)
    return whole[start : start + nbytes]


def _onto_huge_pages(targets: list[Target]) -> None:
    """Move the copies our kernels stream (panels, dot-product panels, int8 panels) into one buffer on transparent
    huge pages. A decode step streams every weight once, and in this VM a TLB miss walks two page tables (guest and
    host): on 2 MB pages SmolLM2's bf16 step ran 4-13% faster (paired runs in one process; the most in the VM's
    high-bandwidth phases), GPT-2's 3-5%."""
    def ours(pw: PackedWeight | None) -> bool:
        return pw is not None and pw.kernel in ("panel", "dpbf16", "dpi8") and pw.copies \
            and pw.packed.layout == torch.strided and pw.packed.is_contiguous()

    def nbytes(pw: PackedWeight) -> int:
        return -(-pw.packed.numel() * pw.packed.element_size() // 64) * 64  # 64-byte aligned slots

    installed = [(t, t.put.get()) for t in targets]
    copies = [c for _, pw in installed if pw is not None for c in (pw, pw.single_kernel) if ours(c)]
    total = sum(nbytes(c) for c in copies)
    if total < HUGE_PAGE:
        return
    arena, offset = huge_page_buffer(total), 0

    def moved(pw: PackedWeight | None) -> PackedWeight | None:
        nonlocal offset
        if not ours(pw):
            return pw
        src = pw.packed
        view = arena[offset : offset + src.numel() * src.element_size()].view(src.dtype).view(src.shape)
        view.copy_(src)
        offset += nbytes(pw)
        return replace(pw, packed=view)

    for t, pw in installed:
        if pw is not None:
            t.put(replace(moved(pw), single_kernel=moved(pw.single_kernel)))


def decode_weights(model: nn.Module) -> Iterator[Target]:
    """Every product a batch-1 decode step of our GPT runs, as :class:`Target` s (fused ones as one)."""
    def linear(kind: str, lin: nn.Module) -> Target:
        return Target(kind, _Slot(lin, "packed"), [lin.weight], lin.weight, lin.bias, lin.__dict__.get("int8"))

    def fused(kind: str, f: object) -> Target:
        weight, bias = f.get()
        return Target(kind, _Slot(f, "packed"), f.sources(), weight, bias, f.int8())

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
    head_int8 = model.__dict__.get("head_int8")  # engine.quant's int8 copy of the head
    if model.lm_head is not None:
        yield replace(linear("head", model.lm_head), int8=head_int8)
    else:
        w = model.tok_emb.weight
        yield Target("head", _Slot(model, "head_packed"), [w], w, None, head_int8)


@torch.no_grad()
def prepack_(model: nn.Module, mode: str = "auto", max_copy_bytes: int | None = None) -> dict[str, str]:
    """Measure and attach packed copies to ``model``'s frozen projections and head where they decode faster.

    Args:
        mode: ``"auto"`` measures; ``"mkl"``, ``"onednn"``, ``"panel"`` or ``"dpbf16"`` packs every weight that
            kernel takes without measuring; ``"scratch"`` uses our kernels everywhere; ``"off"``: PyTorch's plain
            kernels only.
        max_copy_bytes: in ``"auto"`` mode, the most bytes of copies to make (the registry passes what its memory
            cap leaves beside the weights); a kind whose copies would pass it gets the copy-free kernels only
            (kinds in model order: q/k/v, o, gate/up, down, head). None: no limit.

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
    decided: dict[str, tuple[list[PackedWeight] | None, dict[str, float], list[torch.Tensor]]] = {}
    extra = int8_bytes = 0

    def fits(nbytes: int) -> bool:
        return mode != "auto" or max_copy_bytes is None or extra + nbytes <= max_copy_bytes

    for kind, targets in kinds.items():
        if any(t.quantized for t in targets):
            chosen[kind] = "int8"
            if mode in ("auto", "panel", "dpbf16") and kernels.available() and all(t.quantized for t in targets) \
                    and fits(sum(t.int8[0].numel() for t in targets)):
                label, one_row = _pack_int8(targets, mode)
                extra += sum(t.int8[0].numel() for t in targets)
                int8_bytes += sum(t.int8[0].numel() for t in targets)
                chosen[kind] = f"int8 {label}" if one_row else f"int8 rows[1 row]+{label}[2-{PANEL_ROWS} rows]"
            continue
        if mode == "off":
            chosen[kind] = "plain"
            continue
        names = tuple(PACKERS) if mode == "auto" else (mode,)
        if not fits(sum(t.weight.numel() * t.weight.element_size() for t in targets)):
            names = ("scratch",)  # over the copy budget: our kernels on the weights themselves, or plain
        packed, times = choose([t.weight for t in targets], [t.bias for t in targets], names, forced=mode != "auto")
        decided[kind] = (packed, times, [t.weight for t in targets])
        extra += _copy_bytes(packed)
    if mode == "auto":
        _keep_one_op_steps(decided, len(getattr(model, "blocks", ())))
        _keep_one_op_batches(decided, len(getattr(model, "blocks", ())))
        extra = int8_bytes + sum(_copy_bytes(packed) for packed, _, _ in decided.values())  # a switch may drop one
    for kind, (packed, times, _) in decided.items():
        name = chosen[kind] = packed[0].label if packed else "plain"
        logger.debug("decode kernel for %s: %s (%s)", kind, name,
                     ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
        for t, p in zip(kinds[kind], packed or (), strict=False):
            key = source_key(t.sources)
            one = p.single_kernel and replace(p.single_kernel, key=key)
            t.put(replace(p, key=key, single_kernel=one))
    _onto_huge_pages([t for targets in kinds.values() for t in targets])
    model.__dict__["decode_kernels"] = chosen
    model.__dict__["packed_bytes"] = extra
    logger.info("decode kernels: %s (%.1f MB of packed copies)",
                ", ".join(f"{k}={v}" for k, v in chosen.items()), extra / 2**20)
    return chosen
