"""LoRA adapters applied per request, without touching the base weights.

LoRA (Hu et al. 2021) adds a low-rank update to a frozen linear layer: ``y = W x + (alpha / r) * B (A x)`` with
``A`` (r, in) and ``B`` (out, r). Adapters arrive as standard PEFT folders (``adapter_config.json`` +
``adapter_model.safetensors``, keys such as ``base_model.model.blocks.{i}.attn.q_proj.lora_A.weight``) written by
``finetune`` or any PEFT user, plus our ``scratchchat.json`` naming the base they were trained on.

Serving follows LoRAX/Punica's idea of a heterogeneous batch: row ``i`` of one decode batch may use adapter ``a_i``
or none. :class:`BatchLora` is the hook the model calls after every q/k/v/o/gate/up/down projection (or once per
fused q/k/v and gate/up group). Each adapter keeps all its A and B (scale folded into ``B``) in two flat float32
buffers (prefill's matmuls) and two more packed for the decode op (in bf16 for a bf16 base, see :func:`load_adapter`),
and a batch composition only lists which pieces of which buffers each projection needs (as Punica's and S-LoRA's
kernels read each adapter in place): composing a batch copies no weights.
:func:`merge_adapter` folds one adapter into the base weights for maximum speed and :meth:`MergedAdapter.unmerge`
restores the exact original tensors.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine import kernels
from engine.config import ModelConfig
from engine.errors import AdapterMismatch
from weights.store import load_safetensors, sha256_file

logger = logging.getLogger(__name__)

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
PROJ_ORDER = ATTN_PROJS + MLP_PROJS  # a layer's pieces in an adapter's flat buffers: q/k/v and gate/up adjacent
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCRATCHCHAT_META = "scratchchat.json"

# base_model.model.blocks.3.attn.q_proj.lora_A.weight (older PEFT versions keep the ".default" adapter name)
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?blocks\.(\d+)\.(attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$"
)


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-able projection of one block."""
    d, kv, f = config.d_model, config.n_kv_heads * config.head_dim, config.ffn_dim
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "up_proj": (d, f),
              "down_proj": (f, d)}
    if config.mlp == "swiglu":
        shapes["gate_proj"] = (d, f)
    return shapes


def _block_of(proj: str) -> str:
    return "attn" if proj in ATTN_PROJS else "mlp"


def _pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name that ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class LoraAdapter:
    """One loaded adapter: per (layer, projection) the pair ``(A^T (in, r), scale * B^T (r, out))`` in float32.

    Both are views into two flat buffers, ``a_flat`` (each A (r, in) row-major) and ``b_flat`` (each scale * B^T
    (r, out) row-major), laid out layer by layer in :data:`PROJ_ORDER`; ``offsets`` holds each pair's element offsets
    into them (prefill's matmuls read these). The decode op reads ``a_decode`` and ``b_decode`` in place: the same
    values packed by :func:`pack_decode_piece` for its broadcast-form loops (``decode_offsets``; one more copy of the
    adapter, ~20 MB for a rank-16 adapter of every SmolLM2 projection).
    """

    name: str
    base: str | None
    sha256: str  # of adapter_model.safetensors: the adapter's version
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    a_flat: torch.Tensor
    b_flat: torch.Tensor
    offsets: dict[tuple[int, str], tuple[int, int]]
    a_decode: torch.Tensor  # the decode op's copies, see above
    b_decode: torch.Tensor
    decode_offsets: dict[tuple[int, str], tuple[int, int]]
    config: dict = field(default_factory=dict)  # adapter_config.json as read
    meta: dict = field(default_factory=dict)  # scratchchat.json as read ({} when absent)
    path: Path | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Identity of this adapter version (name, file hash): what a session's cache key records."""
        return (self.name, self.sha256)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a_flat, self.b_flat, self.a_decode, self.b_decode))


def pack_decode_piece(a: torch.Tensor, bt: torch.Tensor, *, pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece's A (r, in) and scaled B^T (r, n) packed for the ``scratchchat::lora`` op, flat float32: A as
    (ceil(r / 8), in, 8) (8 ranks side by side per input feature) and B as (ceil(n / 8), ceil8(r), 8) panels (8
    outputs side by side per rank), zeros past r and n: each step then reads one contiguous stream per piece.

    ``pairs`` (the layout of bf16 buffers): A as (ceil(r / 8), ceil(in / 2), 8, 2), each rank's weights for inputs
    (2i, 2i + 1) side by side (a zero past an odd ``in``), what vdpbf16ps multiplies with a pair of bf16 inputs."""
    r, k = a.shape
    n = bt.shape[1]
    rp, np_ = -(-r // 8) * 8, -(-n // 8) * 8
    kp = -(-k // 2) * 2 if pairs else k
    ap = a.new_zeros(rp, kp, dtype=torch.float32)
    ap[:r, :k] = a
    bp = bt.new_zeros(rp, np_, dtype=torch.float32)
    bp[:r, :n] = bt
    a_flat = (ap.view(rp // 8, 8, kp // 2, 2).permute(0, 2, 1, 3) if pairs
              else ap.view(rp // 8, 8, kp).transpose(1, 2)).reshape(-1)
    return a_flat, bp.view(rp, np_ // 8, 8).transpose(0, 1).reshape(-1)


def load_adapter(
    path: str | Path,
    config: ModelConfig,
    *,
    name: str | None = None,
    base_name: str | None = None,
    base_sha256: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """Read a PEFT LoRA folder and check that it fits the base described by ``config``.

    Args:
        path: the adapter folder (adapter_config.json + adapter_model.safetensors [+ scratchchat.json]).
        config: the base model's config; every tensor's shape is checked against it.
        name: the adapter's name (default: the folder name).
        base_name: the base it is being loaded onto; must equal scratchchat.json's ``base`` when that is present.
        base_sha256: the base's weights hash; must equal scratchchat.json's ``base_sha256`` when both are present.
        dtype: the base's dtype as served. For a bf16 base, A and scale * B are rounded to bf16 once here, as the
            base's own weights are (vLLM and LoRAX serve adapters in the model's dtype; PEFT does with
            ``autocast_adapter_dtype=False``), and the decode op reads bf16 copies: half the bytes of a decode step's
            adapter pieces. The arithmetic stays float32 either way (CPU kernels for these small bf16 matmuls are
            about 10x slower than float32 ones), so prefill and decode apply the same values.

    Raises:
        FileNotFoundError: the folder lacks adapter_config.json or adapter_model.safetensors.
        AdapterMismatch: trained for another base, or a tensor's shape does not fit this base, or an unsupported
            PEFT feature (DoRA, LoRA biases, modules_to_save, embedding LoRA).
    """
    path = Path(path)
    name = name or path.name
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"adapter {name!r}: {p} is missing; a PEFT LoRA folder needs "
                                    f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    t0 = time.perf_counter()
    acfg = json.loads(cfg_path.read_text())
    meta_path = path / SCRATCHCHAT_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    trained_on = meta.get("base")
    if base_name is not None and trained_on is not None and trained_on != base_name:
        raise AdapterMismatch(f"adapter {name!r} was trained for base model {trained_on!r}, not {base_name!r}; "
                              f"pick an adapter made for {base_name!r}")
    want_sha = meta.get("base_sha256")
    if base_sha256 and want_sha and want_sha != base_sha256:
        raise AdapterMismatch(f"adapter {name!r} was trained on a different version of {base_name or trained_on!r} "
                              f"(base sha256 {want_sha[:12]}..., this base is {base_sha256[:12]}...)")
    if acfg.get("peft_type", "LORA").upper() != "LORA":
        raise AdapterMismatch(f"adapter {name!r} is a {acfg.get('peft_type')} adapter; only LoRA is supported")
    if acfg.get("use_dora"):
        raise AdapterMismatch(f"adapter {name!r} uses DoRA, which this engine does not apply")
    if acfg.get("bias", "none") != "none" or acfg.get("modules_to_save"):
        raise AdapterMismatch(f"adapter {name!r} trains biases or whole modules (bias={acfg.get('bias')!r}, "
                              f"modules_to_save={acfg.get('modules_to_save')!r}); only plain LoRA is supported")

    sha = sha256_file(w_path)
    try:
        tensors = load_safetensors(w_path, fix="re-save the adapter (python -m finetune lora ... --overwrite)")
    except ValueError as e:
        raise AdapterMismatch(f"adapter {name!r}: {e}") from None
    shapes = projection_shapes(config)
    alpha = float(acfg.get("lora_alpha", 8))
    rslora = bool(acfg.get("use_rslora", False))
    alpha_pattern = acfg.get("alpha_pattern") or {}

    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterMismatch(f"adapter {name!r} has tensor {key!r}, which is not a LoRA A/B of a "
                                  f"q/k/v/o/gate/up/down projection of this model")
        layer, block, proj, ab = int(m[1]), m[2], m[3], m[4]
        if layer >= config.n_layers or proj not in shapes or block != _block_of(proj):
            raise AdapterMismatch(f"adapter {name!r} targets {key!r}, which does not exist in this base "
                                  f"({config.n_layers} layers, projections {sorted(shapes)})")
        parts.setdefault((layer, proj), {})[ab] = t

    found: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (layer, proj), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterMismatch(f"adapter {name!r}: blocks.{layer}.{proj} has lora_{''.join(ab)} but not both")
        a, b = ab["A"], ab["B"]
        n_in, n_out = shapes[proj]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape != (r, n_in) or b.shape != (n_out, r):
            raise AdapterMismatch(
                f"adapter {name!r}: blocks.{layer}.{_block_of(proj)}.{proj} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but this base needs ({r}, {n_in}) and ({n_out}, {r}); it was trained for "
                f"another model")
        module = f"blocks.{layer}.{_block_of(proj)}.{proj}"
        a_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        found[(layer, proj)] = (a, b, a_alpha / math.sqrt(r) if rslora else a_alpha / r)
    if not found:
        raise AdapterMismatch(f"adapter {name!r} holds no LoRA tensors")
    order = sorted(found, key=lambda k: (k[0], PROJ_ORDER.index(k[1])))
    a_flat = torch.empty(sum(found[k][0].numel() for k in order))
    b_flat = torch.empty(sum(found[k][1].numel() for k in order))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    offsets: dict[tuple[int, str], tuple[int, int]] = {}
    a_at = b_at = 0
    for key in order:
        a, b, scale = found[key]
        (r, n_in), n_out = a.shape, b.shape[0]
        av = a_flat[a_at : a_at + r * n_in].view(r, n_in)
        bv = b_flat[b_at : b_at + r * n_out].view(r, n_out)
        av.copy_(a)
        torch.mul(b.float().t(), scale, out=bv)  # the scale folded into B^T in float32
        if dtype == torch.bfloat16:  # the values a bf16 base serves (see above), kept in float32 for prefill
            av.copy_(av.bfloat16())
            bv.copy_(bv.bfloat16())
        weights[key], offsets[key] = (av.t(), bv), (a_at, b_at)
        a_at, b_at = a_at + av.numel(), b_at + bv.numel()
    decode = {key: pack_decode_piece(weights[key][0].t(), weights[key][1], pairs=dtype == torch.bfloat16)
              for key in order}
    a_decode, b_decode = torch.cat([decode[key][0] for key in order]), torch.cat([decode[key][1] for key in order])
    if dtype == torch.bfloat16:  # exact: the values are bf16 already
        a_decode, b_decode = a_decode.bfloat16(), b_decode.bfloat16()
    decode_offsets: dict[tuple[int, str], tuple[int, int]] = {}
    a_at = b_at = 0
    for key in order:
        decode_offsets[key] = (a_at, b_at)
        a_at, b_at = a_at + decode[key][0].numel(), b_at + decode[key][1].numel()
    rank = max(a.shape[0] for a, _, _ in found.values())
    logger.info("loaded adapter %s (rank %d, %d projections) in %.1f ms", name, rank, len(weights),
                1e3 * (time.perf_counter() - t0))
    return LoraAdapter(name=name, base=trained_on, sha256=sha, rank=rank, weights=weights, a_flat=a_flat,
                       b_flat=b_flat, offsets=offsets, a_decode=a_decode, b_decode=b_decode,
                       decode_offsets=decode_offsets, config=acfg, meta=meta, path=path)


# projections that read the same input and that the model runs as one fused matmul (engine.linear.FusedLinears); a hook
# with a ``group`` method adapts each group in one call instead of one call per projection
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}

@dataclass(frozen=True)
class Pieces:
    """One projection's (or fused group's) low-rank pieces under one batch composition, one per (projection,
    contribution) that has weights there, in two forms.

    ``table`` (P, 6) int64 for our ``scratchchat::lora`` op (decode steps and prompts without autograd): [offset of
    its packed A in the contribution's ``a_decode``, rank, output offset, output size, offset of its B panels in
    ``b_decode``, contribution]. ``runs`` for matmuls (autograd): per contribution, a run of its pieces whose A are
    adjacent in its buffer (q/k/v, gate/up), ``(j, A (R, in), [(rank offset in the run, B^T (r, n), output offset),
    ...])``.
    """

    table: torch.Tensor
    runs: tuple[tuple[int, torch.Tensor, tuple[tuple[int, torch.Tensor, int], ...]], ...]


class BatchLora:
    """The ``lora`` hook for one batch composition: row ``i`` uses ``adapters[i]`` (None = base only).

    Build it when the batch composition changes, not per step (building copies no weights). ``merged`` names an
    adapter already folded into the base weights (see :func:`merge_adapter`): rows that use it need nothing, other
    rows subtract it.

    Every distinct (adapter, sign) of the batch is one "contribution" ``j``; ``coef`` (rows, contributions) holds each
    row's sign on the contributions it uses and 0 elsewhere. Without autograd, decode steps and prompts alike run
    our ``lora`` op, where each row (token) computes only its own pieces, reading each adapter's weights in place.
    With autograd (or without our kernels) matmuls run per contribution over the rows that use it: ``x @ A_run^T``
    once for a group's adjacent A (q/k/v, gate/up), times the rows' coefficient, then one small matmul per piece
    into its slice of a float32 delta, added to ``y`` once. For fused q/k/v and gate/up a layer costs four hook
    calls, not seven. Pieces are listed lazily, once per (layer, projection).
    """

    def __init__(self, adapters: Sequence[LoraAdapter | None], *, merged: LoraAdapter | None = None) -> None:
        rows: list[list[tuple[LoraAdapter, float]]] = []  # each row's (adapter, sign) contributions
        for ad in adapters:
            if merged is not None and ad is not None and ad.key == merged.key:
                rows.append([])
            else:
                rows.append(([(ad, 1.0)] if ad is not None else []) + ([(merged, -1.0)] if merged else []))
        self.batch_size = len(rows)
        self.keys = tuple(None if a is None else a.key for a in adapters)
        index: dict[tuple, int] = {}
        self.contributions: list[tuple[LoraAdapter, float]] = []
        for r in rows:
            for a, sign in r:
                if (a.key, sign) not in index:
                    index[(a.key, sign)] = len(self.contributions)
                    self.contributions.append((a, sign))
        # (rows, contributions): a row's sign on each contribution it uses, else 0
        self.coef = torch.zeros(len(rows), len(self.contributions))
        for i, r in enumerate(rows):
            for a, sign in r:
                self.coef[i, index[(a.key, sign)]] = sign
        self.a = [a.a_decode for a, _ in self.contributions]  # what the op reads, contribution by contribution
        self.b = [a.b_decode for a, _ in self.contributions]
        uniform = len({tuple((a.key, sign) for a, sign in r) for r in rows}) == 1
        self.shared = uniform and bool(self.contributions)  # every row: the same contributions (no per-row scaling)
        self.stacked = not uniform and bool(self.contributions)  # rows differ (coef selects each row's)
        self._pieces: dict[tuple[int, str], Pieces | None] = {}
        self._row_spans: dict[int, list[tuple[int, int, float]]] = {}

    @property
    def is_empty(self) -> bool:
        """True when no row needs any LoRA work: pass ``lora=None`` to the model instead."""
        return not self.contributions

    def __call__(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, T, in), y (B, T, out) = base projection output -> y + row-wise scale * x A^T B^T."""
        return self._add_delta(x, y, self.pieces(layer, proj))

    def group(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Like ``__call__`` for the fused output ``y`` (B, T, sum(sizes)) of the projections ``GROUPS[name]``."""
        return self._add_delta(x, y, self.pieces(layer, name, sizes))

    def decode(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None,
               sizes: Sequence[int] | None = None) -> torch.Tensor:
        """A decode step's delta for 2-D x (B, in), y (B, out): ``y + delta``, or ``residual + (y + delta)`` (the
        layer's residual add, float32). ``name``: a projection, or a group of :data:`GROUPS` with its ``sizes``."""
        pk = self.pieces(layer, name, sizes)
        if pk is None:
            return y if residual is None else residual + y
        return torch.ops.scratchchat.lora(x, y, self.a, self.b, pk.table, self.coef_for(x.shape[0]), residual)

    def pieces(self, layer: int, name: str, sizes: Sequence[int] | None = None) -> Pieces | None:
        """The low-rank pieces of projection ``name`` (or of group ``name`` with its ``sizes``) under this batch
        composition, listed on first use; None where no row's adapter touches it."""
        key = (layer, name)
        if key not in self._pieces:
            self._pieces[key] = self._list(layer, GROUPS[name] if sizes is not None else (name,), sizes)
        return self._pieces[key]

    def _list(self, layer: int, projs: tuple[str, ...], sizes: Sequence[int] | None) -> Pieces | None:
        out_at = [0]
        for n in sizes or ():
            out_at.append(out_at[-1] + n)
        table, runs = [], []
        for j, (ad, _) in enumerate(self.contributions):
            run: list[tuple[int, torch.Tensor, int]] = []
            run_a, a_end = None, None  # the run's first A offset, and where its next A must start to join it
            for p, proj in enumerate(projs):
                off = ad.offsets.get((layer, proj))
                if off is None:
                    continue
                at, bt = ad.weights[(layer, proj)]  # (in, r) view, (r, out) with the scale folded in
                n_in, r = at.shape
                out0 = out_at[p] if sizes is not None else 0
                dec = ad.decode_offsets[(layer, proj)]
                table.append([dec[0], r, out0, bt.shape[1], dec[1], j])
                if run and off[0] != a_end:  # not adjacent to the run: close it
                    runs.append(self._run(j, ad, run_a, a_end, n_in, run))
                    run = []
                if not run:
                    run_a = off[0]
                run.append(((off[0] - run_a) // n_in, bt, out0))
                a_end = off[0] + r * n_in
            if run:
                runs.append(self._run(j, ad, run_a, a_end, n_in, run))
        if not table:
            return None
        return Pieces(torch.tensor(table, dtype=torch.int64), tuple(runs))

    @staticmethod
    def _run(j: int, ad: LoraAdapter, a0: int, a1: int, n_in: int, pieces: list) -> tuple:
        return j, ad.a_flat[a0:a1].view(-1, n_in), tuple(pieces)

    def _rows(self, B: int) -> None:
        """A hook of shared contributions serves any batch size; one whose rows differ only its own."""
        if B != self.batch_size and not self.shared:
            raise ValueError(f"this LoRA hook was built for {self.batch_size} rows with different adapters, "
                             f"not {B}")

    def coef_for(self, B: int) -> torch.Tensor:
        """``coef`` for a batch of ``B`` rows (a shared hook serves any batch size)."""
        self._rows(B)
        return self.coef if B == self.batch_size else self.coef[:1].expand(B, -1).contiguous()

    def _spans(self, j: int, B: int) -> list[tuple[int, int, float]]:
        """Contribution ``j``'s rows as maximal runs ``(first, stop, coefficient)`` of rows with the same nonzero
        coefficient (one run for a shared batch; a mixed batch's adapter usually has one row)."""
        self._rows(B)
        if self.shared:
            return [(0, B, float(self.coef[0, j]))]
        spans = self._row_spans.get(j)
        if spans is None:
            spans = []
            for i, c in enumerate(self.coef[:, j].tolist()):
                if c != 0.0 and spans and spans[-1][1] == i and spans[-1][2] == c:
                    spans[-1] = (spans[-1][0], i + 1, c)
                elif c != 0.0:
                    spans.append((i, i + 1, c))
            self._row_spans[j] = spans
        return spans

    def _add_delta(self, x: torch.Tensor, y: torch.Tensor, pk: Pieces | None) -> torch.Tensor:
        """y + the rows' low-rank deltas, computed in float32 (more exact, and small bf16 matmuls are slow on CPU)
        and added to y once. Without autograd our ``scratchchat::lora`` op computes each token's own pieces only
        (SmolLM2, a 4 x 32-token prompt with none + 3 adapters: 20 ms of deltas where the matmuls below took 40);
        with it, or without our kernels, matmuls over the rows of each contribution."""
        if pk is None:
            return y
        B, T, n_in = x.shape
        if not torch.is_grad_enabled() and kernels.available():
            coef = self.coef_for(B) if T == 1 else self.coef_for(B).repeat_interleave(T, dim=0)
            out = torch.ops.scratchchat.lora(x.reshape(B * T, n_in), y.reshape(B * T, -1), self.a, self.b, pk.table,
                                             coef)
            return out.view(y.shape)
        h = x.reshape(B * T, n_in).float()
        d = y.new_zeros((B * T, y.shape[-1]), dtype=torch.float32)
        for j, a, pieces in pk.runs:
            for r0, r1, c in self._spans(j, B):
                rows = slice(r0 * T, r1 * T)  # the batch rows' tokens, contiguous in h and d
                t = h[rows] @ a.t()  # (tokens, R of the run)
                if c != 1.0:
                    t = t * c
                dr = d[rows]
                for k0, bt, out0 in pieces:
                    dr[:, out0 : out0 + bt.shape[1]].addmm_(t[:, k0 : k0 + bt.shape[0]], bt)
        if not y.is_contiguous() or torch.is_grad_enabled():  # a view of something else, or autograd: no in-place
            return y + d.view(y.shape).to(y.dtype)
        # y is the projection's fresh output: add in place (the float32 delta is rounded once, into y's dtype)
        return y.view(B * T, -1).add_(d).view(y.shape)


def _projection(model: nn.Module, layer: int, proj: str) -> nn.Linear:
    block = model.blocks[layer]
    return getattr(block.attn if proj in ATTN_PROJS else block.mlp, proj)


@dataclass
class MergedAdapter:
    """An adapter folded into a model's weights; :meth:`unmerge` puts the original tensors back bit for bit."""

    model: nn.Module
    adapter: LoraAdapter
    originals: dict[tuple[int, str], torch.Tensor]

    def unmerge(self) -> None:
        with torch.no_grad():
            for (layer, proj), w in self.originals.items():
                _projection(self.model, layer, proj).weight.copy_(w)
        self.originals.clear()


def merge_adapter(model: nn.Module, adapter: LoraAdapter) -> MergedAdapter:
    """Fold ``adapter`` into ``model``'s weights: ``W += scale * B @ A`` (computed in float32, cast once).

    Returns a handle whose ``unmerge()`` restores the exact original weights (a copy of each touched weight is
    kept, because ``(W + D) - D != W`` in bf16).
    """
    originals: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        for (layer, proj), (at, bt) in adapter.weights.items():
            lin = _projection(model, layer, proj)
            originals[(layer, proj)] = lin.weight.detach().clone()
            delta = (at.float() @ bt.float()).t()  # (out, in)
            lin.weight.copy_((lin.weight.float() + delta).to(lin.weight.dtype))
    return MergedAdapter(model, adapter, originals)
