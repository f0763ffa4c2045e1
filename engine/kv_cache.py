"""Pre-allocated key/value cache for both model families.

Burkov (*The Hundred-Page Language Models Book*, sec. 4.8): keys and values of earlier tokens never change once
computed, so store them and compute only the new token's q, k and v. Queries are not cached. Unlike the book's
growing list (and LLMs-from-scratch's ``torch.cat`` per step), every layer here owns one buffer of shape
``(batch, n_kv_heads, max_seq_len, head_dim)`` allocated once and written in place, as in gpt-fast's ``KVCache``.

The cache, not the model, owns the position: ``lengths[b]`` is how many tokens row ``b`` holds. Rows may hold
different lengths (continuous batching); the model then attends with a per-row mask. With learned absolute
positions (GPT-2) a token's position is its index in the cache, so overflow is an error, never a silent shift.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from engine import kernels
from engine.config import ModelConfig

LAZY_ZEROS_BYTES = 1 << 20  # CPU buffers from this size on are zero pages mapped on first write (see _zeros)


def _zeros(shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled buffer. On the CPU a big one is an anonymous memory map, whose pages the kernel zero-fills
    when they are first touched: a cache is then resident only where it has held tokens. (The scheduler's SmolLM2
    pool, 8 rows x 4096 tokens, is 720 MB; ``torch.zeros`` wrote all of it on the first request, ~160 ms of its
    time to first token, and kept it resident whatever the conversations used.) The tensor keeps the map alive and
    unmaps it when freed."""
    dev = torch.device(device if device is not None else "cpu")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if dev.type != "cpu" or nbytes < LAZY_ZEROS_BYTES:
        return torch.zeros(shape, device=dev, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


@dataclass
class AttentionPlan:
    """Everything the layers share for one forward pass with a cache: computed once, used by every layer."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    start: int | None  # common first position when every row starts at the same place, else None
    span: int  # number of key positions to attend over: max(positions) + 1
    mask: torch.Tensor | None  # (B, 1, T, span) bool, True = attend; None when the slice is already causal
    is_causal: bool  # let SDPA build the causal mask itself (prefill from position 0)
    advance_to: int | None = None  # every row's new length when known without reading tensors (see commit)
    row_index: torch.Tensor | None = None  # (B, 1) row indices for scattered writes, built on first use
    # set by the model for a decode step through engine.kernels' fused attention: (B,) positions and the float32
    # (cos, sin) tables, (None, None) without RoPE
    decode_positions: torch.Tensor | None = None
    decode_tables: tuple[torch.Tensor | None, torch.Tensor | None] | None = None


class KVCache:
    """Per-layer K/V buffers ``(B, n_kv_heads, S, head_dim)`` plus per-row lengths."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.lengths = lengths  # (B,) int64, on CPU
        self._arange: torch.Tensor | None = None  # 0..max_seq_len-1, sliced for positions instead of built per step
        self._row_views: dict[tuple[int, int], KVCache] = {}  # rows(start, stop) views, reused

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """Allocate a cache for ``batch_size`` rows of up to ``max_seq_len`` tokens (default: the context length)."""
        max_seq_len = max_seq_len or config.context_length
        if max_seq_len > config.context_length:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context_length={config.context_length}")
        shape = (batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        keys = [_zeros(shape, device, dtype) for _ in range(config.n_layers)]
        values = [_zeros(shape, device, dtype) for _ in range(config.n_layers)]
        return cls(keys, values, torch.zeros(batch_size, dtype=torch.long))

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        """Memory one cached token costs across all layers (K and V)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * itemsize

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def pos(self) -> int:
        """The common length of all rows. Raises if rows differ (use ``lengths`` then)."""
        first = int(self.lengths[0])
        if self.batch_size > 1 and not bool((self.lengths == first).all()):
            raise ValueError(f"rows hold different lengths {self.lengths.tolist()}; read .lengths instead")
        return first

    def reset(self) -> None:
        """Forget everything (buffers are reused, not freed)."""
        self.lengths.zero_()

    def crop(self, n: int) -> None:
        """Keep only the first ``n`` positions of every row (e.g. to reuse a shared prefix)."""
        if n < 0:
            raise ValueError(f"cannot crop to a negative length {n}")
        self.lengths.clamp_(max=n)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows ``[start, stop)`` that shares storage (and lengths) with this one.

        The views are kept, so the scheduler asking for the same rows every decode step costs no slicing."""
        if (start, stop) == (0, self.batch_size):
            return self
        view = self._row_views.get((start, stop))
        if view is None:
            view = KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values],
                           self.lengths[start:stop])
            self._row_views[(start, stop)] = view
        return view

    def copy_row_(self, dst: int, src_cache: KVCache, src: int = 0) -> None:
        """Copy row ``src`` of ``src_cache`` (its valid prefix only) into row ``dst`` of this cache."""
        n = int(src_cache.lengths[src])
        if n > self.max_seq_len:
            raise ValueError(f"row holds {n} tokens but this cache has room for {self.max_seq_len}")
        self.copy_positions_(dst, src_cache, src, n)
        self.lengths[dst] = n

    def copy_positions_(self, dst: int, src_cache: KVCache, src: int, n: int) -> None:
        """Keys and values of positions ``[0, n)`` of row ``src`` of ``src_cache`` into row ``dst`` (lengths are
        the caller's). One op for every layer when our kernels run (engine.kernels' ``copy_positions``: a turn's
        cached history into its pool row is half the time of a copy per layer), else a copy per layer."""
        if src_cache is self and src == dst:
            return
        mine, theirs = self.keys + self.values, src_cache.keys + src_cache.values
        if kernels.available() and all(t.device.type == "cpu" and t.dtype == mine[0].dtype and t.stride(3) == 1
                                       and t.stride(2) == t.shape[3] for t in mine + theirs):
            torch.ops.scratchchat.copy_positions(mine, dst, theirs, src, n)
            return
        for a, b in zip(mine, theirs, strict=True):
            a[dst, :, :n].copy_(b[src, :, :n])

    def extract_row(self, row: int) -> KVCache:
        """A compact batch-1 copy of one row, sized to exactly its length (for keeping a session's prefix)."""
        n = int(self.lengths[row])
        k0 = self.keys[0]
        shape = (1, k0.shape[1], n, k0.shape[3])
        out = KVCache([torch.empty(shape, dtype=k0.dtype, device=k0.device) for _ in self.keys],
                      [torch.empty(shape, dtype=k0.dtype, device=k0.device) for _ in self.values],
                      torch.tensor([n], dtype=torch.long))
        out.copy_positions_(0, self, row, n)
        return out

    def plan(self, n_new: int, positions: torch.Tensor | None = None) -> AttentionPlan:
        """Work out where ``n_new`` tokens per row go and how they attend. Checks for overflow.

        Args:
            n_new: tokens being added to every row in this forward pass.
            positions: optional (B, n_new) explicit positions; by default each row continues at its length.
        """
        bsz = self.batch_size
        if positions is None:
            # The common case (decode or prefill with every row at the same length) reads one or two numbers and
            # slices a cached arange, so a decode step builds no tensors here.
            lo = int(self.lengths[0]) if bsz == 1 else int(self.lengths.min())
            if bsz == 1 or lo == int(self.lengths.max()):
                return self._uniform_plan(lo, n_new, bsz)
            positions = self.lengths[:, None] + torch.arange(n_new)
        elif positions.dim() == 1:
            positions = positions[None, :].expand(bsz, -1)
        positions = positions.to(torch.long).cpu()
        end = int(positions.max()) + 1
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: {int(self.lengths.max())} cached + {n_new} new tokens needs {end} positions, "
                f"but the cache holds {self.max_seq_len}"
            )
        first = positions[:, 0]
        contiguous = bool((positions[:, -1] - first == n_new - 1).all())
        start = int(first[0]) if contiguous and bool((first == first[0]).all()) else None
        if start is not None and start == 0:
            return AttentionPlan(positions, start, end, None, n_new > 1)
        if start is not None and n_new == 1:
            return AttentionPlan(positions, start, end, None, False)
        keys = torch.arange(end)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, span)
        return AttentionPlan(positions, start, end, mask, False)

    def _uniform_plan(self, start: int, n_new: int, bsz: int) -> AttentionPlan:
        """Plan for ``n_new`` tokens appended to rows that all hold ``start`` tokens."""
        end = start + n_new
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: {start} cached + {n_new} new tokens needs {end} positions, "
                f"but the cache holds {self.max_seq_len}"
            )
        if self._arange is None:
            self._arange = torch.arange(self.max_seq_len)
        positions = self._arange[start:end][None].expand(bsz, -1)  # (B, T)
        mask = None
        if start > 0 and n_new > 1:  # new tokens see the whole prefix and each other causally
            keys = self._arange[:end]
            mask = (keys[None, :] <= positions[0, :, None])[None, None]  # (1, 1, T, span)
        return AttentionPlan(positions, start, end, mask, start == 0 and n_new > 1, advance_to=end)

    def write(self, layer: int, plan: AttentionPlan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store new ``k``/``v`` (B, n_kv_heads, T, head_dim) in place; return the keys/values to attend over."""
        kc, vc = self.keys[layer], self.values[layer]
        if plan.start is not None:
            t = k.shape[2]
            kc.narrow(2, plan.start, t).copy_(k)  # narrow: one view op where [:, :, a:b] is three
            vc.narrow(2, plan.start, t).copy_(v)
        else:
            if plan.row_index is None:
                plan.row_index = torch.arange(k.shape[0])[:, None]  # built once per forward, shared by the layers
            # advanced indices on dims 0 and 2 move to the front: the target is (B, T, n_kv_heads, head_dim)
            kc[plan.row_index, :, plan.positions] = k.transpose(1, 2)
            vc[plan.row_index, :, plan.positions] = v.transpose(1, 2)
        return kc.narrow(2, 0, plan.span), vc.narrow(2, 0, plan.span)

    def commit(self, plan: AttentionPlan) -> None:
        """Advance the lengths after a forward pass has written every layer."""
        if plan.advance_to is not None:
            self.lengths.fill_(plan.advance_to)
        else:
            self.lengths.copy_(torch.maximum(self.lengths, plan.positions[:, -1] + 1))
