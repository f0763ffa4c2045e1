"""LoRA adapters applied per request, without touching the base weights.

LoRA (Hu et al. 2021) adds a low-rank update to a frozen linear layer: ``y = W x + (alpha / r) * B (A x)`` with
``A`` (r, in) and ``B`` (out, r). Adapters arrive as standard PEFT folders (``adapter_config.json`` +
``adapter_model.safetensors``, keys such as ``base_model.model.blocks.{i}.attn.q_proj.lora_A.weight``) written by
``finetune`` or any PEFT user, plus our ``scratchchat.json`` naming the base they were trained on.

Serving follows LoRAX/Punica's idea of a heterogeneous batch: row ``i`` of one decode batch may use adapter ``a_i``
or none. :class:`BatchLora` is the hook the model calls after every q/k/v/o/gate/up/down projection (or once per
fused q/k/v and gate/up group). It packs the batch's adapters once per composition (scale folded into ``B``), so
each hooked projection costs two small matmuls for the whole batch, with a per-row mask when rows differ.
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
    """One loaded adapter: per (layer, projection) the pair ``(A^T (in, r), scale * B^T (r, out))``."""

    name: str
    base: str | None
    sha256: str  # of adapter_model.safetensors: the adapter's version
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    config: dict = field(default_factory=dict)  # adapter_config.json as read
    meta: dict = field(default_factory=dict)  # scratchchat.json as read ({} when absent)
    path: Path | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Identity of this adapter version (name, file hash): what a session's cache key records."""
        return (self.name, self.sha256)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        weights = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in self.weights.items()}
        return LoraAdapter(self.name, self.base, self.sha256, self.rank, weights, self.config, self.meta, self.path)


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
        dtype: dtype of the stored A/B and of the low-rank product. float32 (the default) even for a bf16 base:
            it is more exact, and CPU kernels for these small bf16 matmuls are about 10x slower than float32 ones.

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

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for (layer, proj), ab in sorted(parts.items()):
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
        scale = a_alpha / math.sqrt(r) if rslora else a_alpha / r
        # fold the scale into B in float32, then cast once to the compute dtype
        at = a.float().t().contiguous().to(dtype)  # (in, r)
        bt = (b.float() * scale).t().contiguous().to(dtype)  # (r, out)
        weights[(layer, proj)] = (at, bt)
        rank = max(rank, r)
    if not weights:
        raise AdapterMismatch(f"adapter {name!r} holds no LoRA tensors")
    logger.info("loaded adapter %s (rank %d, %d projections) in %.1f ms", name, rank, len(weights),
                1e3 * (time.perf_counter() - t0))
    return LoraAdapter(name=name, base=trained_on, sha256=sha, rank=rank, weights=weights, config=acfg, meta=meta,
                       path=path)


# projections that read the same input and that the model runs as one fused matmul (engine.linear.FusedLinears); a hook
# with a ``group`` method adapts each group in one call instead of one call per projection
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}

@dataclass(frozen=True)
class Packed:
    """One projection's (or fused group's) low-rank work under one batch composition, in two forms.

    For many rows (prefill), two small matmuls over the contributions stacked along the rank: ``a_t`` (R, in),
    ``b_t`` (out, R) (block-diagonal over a group's outputs) and ``mask`` (rows, R) or None. For decode steps (up to
    :data:`DECODE_ROWS` rows) our ``scratchchat::lora`` op, which computes each row's own pieces only:
    ``pieces`` (P, 6) int64 [rank offset into ``a_t``, rank, output offset, output size, offset of its B^T in
    ``b_flat``, contribution], ``b_flat`` each piece's (rank, output size) B^T flattened, ``coef`` (rows,
    contributions) each row's sign on each contribution (0 where it does not use it).
    """

    a_t: torch.Tensor
    b_t: torch.Tensor
    mask: torch.Tensor | None
    b_flat: torch.Tensor
    pieces: torch.Tensor
    coef: torch.Tensor


DECODE_ROWS = 8  # up to this many rows (a decode step's batch) the low-rank products run through our kernels


class BatchLora:
    """The ``lora`` hook for one batch composition: row ``i`` uses ``adapters[i]`` (None = base only).

    Build it when the batch composition changes, not per step. ``merged`` names an adapter already folded into
    the base weights (see :func:`merge_adapter`): rows that use it need nothing, other rows subtract it.

    Every distinct (adapter, sign) of the batch is one "contribution". For each projection the contributions'
    ``A`` are concatenated along the rank, ``A_all`` (in, R), and their ``B`` likewise, ``B_all`` (R, out); a
    (rows, R) mask holds each row's sign on its own contributions' rank columns and zero elsewhere. Then
    ``delta = ((x @ A_all) * mask) @ B_all``: two small matmuls for the whole batch, whatever its mix, and every
    adapter's weights are read once per step, not once per row. When every row has the same contributions the mask
    is folded into ``B_all`` (two plain matmuls, the first fused into an ``addmm``). For fused q/k/v and gate/up the
    projections of a group are packed together (``B_all`` block-diagonal over the outputs), so a layer costs four
    hook calls, not seven. Packs are built lazily, once per (layer, projection) and composition.
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
        uniform = len({tuple((a.key, sign) for a, sign in r) for r in rows}) == 1
        self.shared = uniform and bool(self.contributions)  # every row: the same contributions (no mask)
        self.stacked = not uniform and bool(self.contributions)  # rows differ (a mask selects each row's)
        self._packs: dict[tuple[int, str], Packed | None] = {}

    @property
    def is_empty(self) -> bool:
        """True when no row needs any LoRA work: pass ``lora=None`` to the model instead."""
        return not self.contributions

    def __call__(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, T, in), y (B, T, out) = base projection output -> y + row-wise scale * x A^T B^T."""
        return _add_delta(x, y, self.packed(layer, proj))

    def group(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Like ``__call__`` for the fused output ``y`` (B, T, sum(sizes)) of the projections ``GROUPS[name]``."""
        return _add_delta(x, y, self.packed(layer, name, sizes))

    def decode(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None,
               sizes: Sequence[int] | None = None) -> torch.Tensor:
        """A decode step's delta for 2-D x (B, in), y (B, out): ``y + delta``, or ``residual + (y + delta)`` (the
        layer's residual add, float32). ``name``: a projection, or a group of :data:`GROUPS` with its ``sizes``."""
        pk = self.packed(layer, name, sizes)
        if pk is None:
            return y if residual is None else residual + y
        return torch.ops.scratchchat.lora(x, y, pk.a_t, pk.b_flat, pk.pieces, pk.coef, residual)

    def packed(self, layer: int, name: str, sizes: Sequence[int] | None = None) -> Packed | None:
        """The low-rank work of projection ``name`` (or of group ``name`` with its ``sizes``) under this batch
        composition, built on first use; None where no row's adapter touches it."""
        key = (layer, name)
        if key not in self._packs:
            self._packs[key] = self._pack(layer, GROUPS[name] if sizes is not None else (name,),
                                          None if sizes is None else tuple(sizes))
        return self._packs[key]

    def _pack(self, layer: int, projs: tuple[str, ...], sizes: tuple[int, ...] | None) -> Packed | None:
        a_parts, b_parts, mask_parts = [], [], []
        flat, pieces = [], []  # the decode op's form: each piece's own B^T, no zeros
        rank_at = flat_at = 0
        offsets = [0]
        for n in sizes or ():
            offsets.append(offsets[-1] + n)
        for p, proj in enumerate(projs):
            for j, (ad, sign) in enumerate(self.contributions):
                w = ad.weights.get((layer, proj))
                if w is None:
                    continue
                at, bt = w  # (in, r), (r, out) with the scale folded in
                r, out0 = at.shape[1], offsets[p] if sizes is not None else 0
                pieces.append([rank_at, r, out0, bt.shape[1], flat_at, j])
                flat.append(bt.float().reshape(-1))
                rank_at, flat_at = rank_at + r, flat_at + bt.numel()
                if sizes is not None:  # place B's columns at this projection's slice of the fused output
                    wide = bt.new_zeros(bt.shape[0], offsets[-1])
                    wide[:, offsets[p] : offsets[p + 1]] = bt
                    bt = wide
                if self.shared:
                    bt = bt if sign == 1.0 else -bt
                else:
                    mask_parts.append(self.coef[:, j : j + 1].expand(-1, at.shape[1]))
                a_parts.append(at)
                b_parts.append(bt)
        if not a_parts:
            return None
        a_t, b_t = torch.cat(a_parts, dim=1).t().contiguous(), torch.cat(b_parts, dim=0).t().contiguous()
        mask = torch.cat(mask_parts, dim=1).to(a_t.dtype) if mask_parts else None
        return Packed(a_t, b_t, mask, torch.cat(flat), torch.tensor(pieces, dtype=torch.int64), self.coef)


def _add_delta(x: torch.Tensor, y: torch.Tensor, packed: Packed | None) -> torch.Tensor:
    """y + ((x @ A) * mask) @ B, the low-rank part in the adapter's dtype (float32 for a bf16 base: small bf16
    matmuls are slow on CPU and the sum is more exact). Decode steps (one token per row, up to
    :data:`DECODE_ROWS` rows, no autograd) run our ``scratchchat::lora`` op instead, which computes each row's own
    pieces only (no block-diagonal zeros, no masked-out rows) and adds them to y once."""
    if packed is None:
        return y
    a_t, b_t, mask = packed.a_t, packed.b_t, packed.mask
    B, T, n_in = x.shape
    if T == 1 and B <= DECODE_ROWS and a_t.dtype == torch.float32 and not torch.is_grad_enabled() \
            and kernels.available():  # a decode step: our op, each row's own pieces only
        out = torch.ops.scratchchat.lora(x.reshape(B, n_in), y.reshape(B, -1), a_t, packed.b_flat, packed.pieces,
                                         packed.coef)
        return out.view(y.shape)
    h = x.view(B * T, n_in) if x.is_contiguous() else x.reshape(B * T, n_in)
    h = h if h.dtype == a_t.dtype else h.to(a_t.dtype)
    h = torch.mm(h, a_t.t())  # (B*T, R)
    if mask is not None:
        h = h * mask if T == 1 else (h.view(B, T, -1) * mask[:, None, :]).view(B * T, -1)
    if not y.is_contiguous() or torch.is_grad_enabled():  # a view of something else, or autograd: no in-place
        return y + torch.mm(h, b_t.t()).view(y.shape).to(y.dtype)
    y2 = y.view(B * T, -1)
    if y.dtype == a_t.dtype:
        return torch.addmm(y2, h, b_t.t()).view(y.shape)
    # y is the projection's fresh output: add in place (the float32 product is rounded once, into y's dtype)
    return y2.add_(torch.mm(h, b_t.t())).view(y.shape)


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
