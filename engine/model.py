"""The from-scratch GPT: one nn.Module for the GPT-2 family and the Llama-style family.

GPT-2 (Radford et al. 2019; Raschka, *Build a Large Language Model (From Scratch)*, ch. 3-4): learned absolute
position embeddings, pre-LayerNorm blocks (biased variance, eps 1e-5), GELU with the tanh approximation, optional
q/k/v bias, head tied to the token embedding.
Llama-style (Touvron et al. 2023; Burkov, *The Hundred-Page Language Models Book*, ch. 4): rotary position
embeddings on q and k only (HF "rotate-half" layout, so HF weights load without permutation), RMSNorm, SwiGLU MLP,
grouped-query attention (n_kv_heads < n_heads), tied or untied head.

Q, K and V are separate ``nn.Linear`` layers with HF Llama's names so that peft's ``target_modules`` can name each
projection and HF checkpoints map almost one-to-one. The model never samples, reads files or keeps a position
counter: ``forward`` takes an optional :class:`~engine.kv_cache.KVCache`, which owns the positions.

Inference fast path (no autograd, :mod:`engine.linear`): one-row inputs run as a GEMV (or an int8 or packed
kernel), frozen q/k/v and gate/up projections as one matmul each, RoPE rotates q and k together, positions are
slices rather than gathers, and dropout is skipped. Training, peft-wrapped projections and the LoRA hook's
per-projection ``(x, y)`` contract are unchanged: the fused output is split back into q, k and v for the hook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.config import ModelConfig
from engine.decode import runner_for
from engine.kv_cache import AttentionPlan, KVCache
from engine.linear import FusedLinears, apply_linear, is_plain_linear, linear_q, refine_top_logits

# A per-request LoRA hook: (layer index, projection name, input x, base output y) -> adapted output.
LoraHook = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with biased variance (no Bessel correction), as GPT-2 and the book use."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # scale, initialised to 1
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None  # shift, initialised to 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / sqrt(var_biased + eps) * scale + shift, computed in float32; the output is in the weights'
        # dtype because it feeds the next matmul (the residual stream itself stays float32, see GPT.forward)
        if not torch.is_grad_enabled() and self.weight.dtype in (torch.float32, torch.bfloat16) \
                and (self.bias is None or self.bias.dtype == self.weight.dtype) and kernels.available():
            return torch.ops.scratchchat.layer_norm(x, self.weight, self.bias, self.eps)  # what decode steps run
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).to(self.weight.dtype)


class RMSNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight; no mean subtraction, no bias (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.weight.dtype in (torch.float32, torch.bfloat16) \
                and kernels.available():  # one op instead of eight (engine.kernels)
            return torch.ops.scratchchat.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # float32 times the (exactly widened) weight by type promotion, without a cast op; feeds a matmul: the
        # weights' dtype
        return (x32 * self.weight).to(self.weight.dtype)


def build_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.bias)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) ~= 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's form (Hendrycks & Gimpel 2016). Training
    runs torch's fused kernel (and its gradient); inference our op, which decode steps run too (one op instead of
    at::gelu's dispatch; float32 math as x / (1 + exp(-2u)), which keeps the digits that 1 + tanh(u) cancels for
    large negative x)."""
    if not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.bfloat16) and kernels.available():
        return torch.ops.scratchchat.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


def build_rope_cache(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (context_length, head_dim) in float32, rotate-half layout: theta_p = base^(-2p/d)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    pos = torch.arange(config.context_length, dtype=torch.float64)
    if config.rope_scaling:
        pos = pos / config.rope_scaling
    angles = torch.outer(pos, inv_freq)  # (S, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, hd): both halves share a frequency
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) of x (B, H, T, hd) by the angles in cos/sin (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin with its first half negated), the form :func:`_apply_rope_rolled` takes; built once per forward."""
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in four ops instead of seven, bit for bit: rotate_half(x) * sin == roll(x, hd/2) * signed_sin
    exactly (only signs move). Not an ``addcmul``: its single rounding differs from HF's in bf16."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _prefix_kernel_for(dtype: torch.dtype) -> bool:
    """Whether attention at inference (a prompt, a chat turn over its cached prefix, the no-cache path) runs
    engine.kernels' ``prefix_attention`` (float32 sums) for this dtype: float32 wherever our kernels run; bf16 too,
    except on CPUs with AMX, where PyTorch's SDPA multiplies bf16 on the AMX tiles (not measured against ours: no
    such machine at hand when this was written)."""
    if dtype == torch.float32:
        return kernels.available()
    return dtype == torch.bfloat16 and not kernels.has_amx() and kernels.available()


class Attention(nn.Module):
    """Causal multi-head attention with grouped K/V heads (MHA when n_kv_heads == n_heads, MQA when 1)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.dropout = config.dropout
        self._qkv: FusedLinears | None = None  # inference-only fused q/k/v weight, built on first use

    def _fused_qkv(self) -> FusedLinears | None:
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if not FusedLinears.usable(projs):
            return None
        if self._qkv is None or self._qkv.linears != projs:
            self._qkv = FusedLinears(projs)
        return self._qkv

    def _project_qkv(self, x: torch.Tensor, lora: LoraHook | None) -> tuple[torch.Tensor, ...]:
        """q (B, T, d), k and v (B, T, kv), or with the fused path and no hook one (B, T, d + 2 kv) tensor."""
        fused = None if torch.is_grad_enabled() else self._fused_qkv()
        if fused is None:
            q, k, v = apply_linear(self.q_proj, x), apply_linear(self.k_proj, x), apply_linear(self.v_proj, x)
        else:
            qkv = fused.apply(x)
            if lora is None:
                return (qkv,)
            group = getattr(lora, "group", None)  # a hook that adapts the fused q/k/v in one call
            if group is not None:
                return (group(self.layer_idx, "qkv", x, qkv, fused.sizes),)
            q, k, v = qkv.split(fused.sizes, dim=-1)
        if lora is not None:
            q, k, v = lora(self.layer_idx, "q_proj", x, q), lora(self.layer_idx, "k_proj", x, k), \
                lora(self.layer_idx, "v_proj", x, v)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                plan: AttentionPlan | None, lora: LoraHook | None, last: bool = False) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); with ``last``, (B, 1, d) for the last position only (keys and values of every
        position are still computed and cached: only the queries of the others are dropped)."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        proj = self._project_qkv(x, lora)
        if len(proj) == 1 and plan is not None and plan.decode_tables is not None:
            # a decode step (one new token per row): RoPE, the cache write and attention over each row's own cached
            # positions in one op (engine.kernels), the same arithmetic as the general path below
            y = torch.ops.scratchchat.decode_attention(proj[0].view(B, -1), cache.keys[self.layer_idx],
                                                       cache.values[self.layer_idx], plan.decode_positions,
                                                       *plan.decode_tables, H).view(B, T, -1)
            out = apply_linear(self.o_proj, y)
            return out if lora is None else lora(self.layer_idx, "o_proj", y, out)
        if len(proj) == 1:  # fused: heads [0, H) are q, [H, H + Hkv) k, the rest v
            qkv = proj[0].view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2 Hkv, T, head_dim)
            qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv :]
            if rope is not None:  # one rotation for queries and keys together
                qk = _apply_rope_rolled(qk, *rope)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q, k, v = proj
            q = q.view(B, T, H, hd).transpose(1, 2)  # (B, n_heads, T, head_dim)
            k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
            v = v.view(B, T, Hkv, hd).transpose(1, 2)
            if rope is not None:  # RoPE on queries and keys only, never values
                q, k = _apply_rope_rolled(q, *rope), _apply_rope_rolled(k, *rope)
        mask, is_causal = None, True
        if cache is not None:
            k, v = cache.write(self.layer_idx, plan, k, v)  # (B, n_kv_heads, span, head_dim)
            mask, is_causal = plan.mask, plan.is_causal
        if last and T > 1:  # the last query sees every key (it is last in causal order): no mask needed
            q, T = q[:, :, -1:], 1
            mask, is_causal = (None if mask is None else mask[..., -1:, :]), False
        if hd % 8 == 0 and not self.training and not torch.is_grad_enabled() and _prefix_kernel_for(q.dtype):
            # engine.kernels' attention, the query heads that share a key/value head taken together. New tokens over
            # a cached prefix (a chat's next turn, a prefill chunk): SmolLM2's 54 queries over 1094 keys ran
            # 1.17-1.19x SDPA's speed in float32 and 1.26x in bf16, 8 queries 1.5-2x, the last block's one query
            # ~1.7x (2-core Zen4 EPYC, interleaved runs); bf16 scores by vdpbf16ps ~2.5x SDPA (2-core Zen5 EPYC). A
            # prompt from the start (a first turn; the no-cache path) too: 2-4x SDPA's causal attention at 16-512
            # tokens, bf16 and float32, SmolLM2's and GPT-2's heads (2-core Zen4 EPYC). Query t sees the keys up
            # to its position: the cache's positions, or without a cache its index among the keys given.
            if plan is not None:
                positions = plan.positions[:, -T:]
            else:
                positions = torch.arange(k.shape[2] - T, k.shape[2]).expand(B, T)
            y = torch.ops.scratchchat.prefix_attention(q, k, v, positions)  # (B, T, n_heads * hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, n_heads, T, head_dim)
            y = y.transpose(1, 2).reshape(B, T, -1)
        out = apply_linear(self.o_proj, y)
        return out if lora is None else lora(self.layer_idx, "o_proj", y, out)


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))), a 4x expansion. Llama: down(silu(gate(x)) * up(x)) (SwiGLU, Shazeer 2020)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.swiglu = config.mlp == "swiglu"
        d, f = config.d_model, config.ffn_dim
        if self.swiglu:
            self.gate_proj = nn.Linear(d, f, bias=config.bias)
        self.up_proj = nn.Linear(d, f, bias=config.bias)
        self.down_proj = nn.Linear(f, d, bias=config.bias)
        self._gate_up: FusedLinears | None = None  # inference-only fused gate/up weight (SwiGLU)

    def _fused_gate_up(self) -> FusedLinears | None:
        projs = (self.gate_proj, self.up_proj)
        if torch.is_grad_enabled() or not FusedLinears.usable(projs):
            return None
        if self._gate_up is None or self._gate_up.linears != projs:
            self._gate_up = FusedLinears(projs)
        return self._gate_up

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        i = self.layer_idx
        if self.swiglu:
            fused = self._fused_gate_up()
            group = getattr(lora, "group", None)  # a hook that adapts the fused gate/up in one call
            if fused is not None:
                gate_up = fused.apply(x)
                if group is not None:
                    gate_up = group(i, "gate_up", x, gate_up, fused.sizes)
                if (lora is None or group is not None) and kernels.available():  # fused: no grad here
                    h = torch.ops.scratchchat.silu_mul(gate_up)  # one op for split, silu and mul
                    out = apply_linear(self.down_proj, h)
                    return out if lora is None else lora(i, "down_proj", h, out)
                gate, up = gate_up.split(fused.sizes, dim=-1)
            else:
                gate, up = apply_linear(self.gate_proj, x), apply_linear(self.up_proj, x)
            if lora is not None and (fused is None or group is None):
                gate, up = lora(i, "gate_proj", x, gate), lora(i, "up_proj", x, up)
            h = F.silu(gate) * up
        else:
            up = apply_linear(self.up_proj, x)
            if lora is not None:
                up = lora(i, "up_proj", x, up)
            h = gelu_tanh(up)
        out = apply_linear(self.down_proj, h)
        return out if lora is None else lora(i, "down_proj", h, out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); shape (B, T, d_model) in and out."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config, layer_idx)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                plan: AttentionPlan | None, lora: LoraHook | None, last: bool = False) -> torch.Tensor:
        """With ``last``, only the last position comes out, (B, 1, d_model), but every position's keys and values
        go into the cache (the last block of a prefill that needs the next token's logits only)."""
        h = self.attn(self.attn_norm(x), rope, cache, plan, lora, last)
        if last:
            x = x[:, -1:]
        if not self.training:  # dropout is the identity: skip two module calls per block
            x = x + h
            return x + self.mlp(self.mlp_norm(x), lora)
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.mlp_norm(x), lora))


class GPT(nn.Module):
    """Decoder-only transformer for both families; ``forward(idx) -> logits (B, T, vocab_size)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = build_norm(config)
        # A tied head reuses tok_emb.weight in forward, so the state dict holds the matrix once.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.pos_emb == "rope":
            cos, sin = build_rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (context_length, head_dim), float32
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> GPT:
        """``Module._apply`` (``.to``, ``.bfloat16()``, ``.to_empty``...) with the RoPE angle tables kept in float32:
        a cast of the weights rebuilds them from the config on their new device instead of rounding them to 8-bit
        mantissas, which the attention would then widen again (the decode op: the whole table, every layer of every
        step, ~2 MB a layer for SmolLM2; measured 0.75 ms of a 3-layer model's 1.2 ms step)."""
        super()._apply(fn, recurse)
        cos = self._buffers.get("rope_cos")
        if cos is not None and cos.dtype != torch.float32:
            fresh = build_rope_cache(self.config)
            self.rope_cos, self.rope_sin = (t.to(cos.device) for t in fresh)
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's init (normal, std 0.02); loaders overwrite it, training from scratch starts here.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        lora: LoraHook | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            idx: (B, T) token ids.
            cache: optional KV cache with B rows; new keys/values are written in place and its lengths advance.
            positions: optional (B, T) or (T,) absolute positions of the new tokens. Defaults to continuing each
                cache row, or to ``0..T-1`` without a cache.
            lora: optional per-request LoRA hook (see :mod:`engine.lora`).
            last_only: return logits for the last position only, (B, 1, vocab_size), which saves the head's
                (T x vocab) matmul during prefill, and the last block's attention output and MLP for the other
                positions (their keys and values are still cached).
            keep: optional (B, T) bool mask of the positions that need logits. Training passes
                ``targets != -100``: the head's matmul, the logits and the loss's softmax (the biggest tensors of a
                step at a 49k vocabulary) then skip padding and masked instruction tokens.

        Returns:
            logits (B, T, vocab_size); (B, 1, vocab_size) with ``last_only``; (N, vocab_size) for the N kept
            positions, in row-major order, with ``keep``.
        """
        if keep is not None and (last_only or keep.shape != idx.shape):
            raise ValueError(f"keep must be a (B, T) mask like idx {tuple(idx.shape)}, without last_only")
        B, T = idx.shape
        plan = None
        start = None  # the common first position of every row, when known without reading tensors
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache has {cache.batch_size} rows but the input has batch size {B}")
            plan = cache.plan(T, positions)
            if plan.span > self.config.context_length:
                raise ValueError(f"position {plan.span - 1} is past context_length={self.config.context_length}")
            if T == 1 and not torch.is_grad_enabled() and kernels.available():
                plan.decode_positions = plan.positions[:, 0].contiguous()  # (B,) where each row's token goes
                plan.decode_tables = (self.rope_cos, self.rope_sin) if self.pos_emb is None else (None, None)
            positions, start = plan.positions, plan.start
        elif positions is None:
            if T > self.config.context_length:
                raise ValueError(f"sequence of {T} tokens exceeds context_length={self.config.context_length}")
            start = 0
        else:
            positions = positions.to(idx.device)
            if int(positions.max()) >= self.config.context_length:
                raise ValueError(f"position {int(positions.max())} is past context_length={self.config.context_length}")

        # The residual stream is kept in float32 whatever the weights' dtype: SmolLM2's activations reach ~2.5e4,
        # where a bf16 ulp is 128, and a bf16 residual stream turned its answer to "What is the capital of France?"
        # into noise. Norm outputs (the matmul inputs) and attention/MLP outputs are in the weights' dtype.
        runner = None
        if plan is not None and plan.decode_tables is not None and not self.training \
                and (lora is None or hasattr(lora, "decode")):
            runner = runner_for(self, B)  # a decode step: the resolved layer loop (engine.decode)
            if runner is not None and keep is None:
                logits = runner.logits(idx.view(B), cache, plan, lora)  # the whole step in one op, if it can
                if logits is not None:
                    cache.commit(plan)
                    return logits.view(B, 1, -1)
        x = self.tok_emb(idx).float()  # (B, T, d_model)
        dtype = self.tok_emb.weight.dtype
        rope = None
        if self.pos_emb is not None:
            if start is not None:  # contiguous positions: a slice instead of a gather
                x = x + self.pos_emb.weight[start : start + T]  # (T, d) broadcast over the batch
            else:
                x = x + self.pos_emb(positions.to(idx.device))  # (T, d) or (B, T, d)
        elif runner is not None:
            pass  # the decode attention op rotates with the float32 tables itself
        elif start is not None:
            # (1, 1, T, head_dim) in the weights' dtype, broadcast over batch and heads
            rope = _rope_tables(self.rope_cos[start : start + T].to(dtype)[None, None],
                                self.rope_sin[start : start + T].to(dtype)[None, None])
        else:
            pos = positions.to(idx.device)
            pos = pos if pos.dim() == 2 else pos[None]
            # (B|1, 1, T, head_dim) in the weights' dtype, broadcast over heads
            rope = _rope_tables(self.rope_cos[pos][:, None].to(dtype), self.rope_sin[pos][:, None].to(dtype))
        if self.training:
            x = self.drop(x)
        if runner is not None:
            x = runner(x.view(B, -1), cache, plan, lora).view(B, 1, -1)
        else:
            # with last_only the last block computes the last position only (llama.cpp skips the unused rows of
            # its last layer too): 1/n_layers of a prefill's attention and MLP work
            final = len(self.blocks) - 1 if last_only and T > 1 else -1
            for i, block in enumerate(self.blocks):
                x = block(x, rope, cache, plan, lora, i == final)
        if cache is not None:
            cache.commit(plan)
        if last_only:
            x = x[:, -1:]
        elif keep is not None:
            x = x[keep]  # (N, d_model)
        x = self.norm_f(x)
        head_int8 = self.__dict__.get("head_int8")  # engine.quant: an int8 copy of the head for decode steps
        if self.lm_head is None:
            weight = self.tok_emb.weight
            logits = linear_q(x, weight, None, head_int8, self.__dict__.get("head_packed"))
        elif head_int8 is not None and is_plain_linear(self.lm_head):
            weight = self.lm_head.weight
            logits = linear_q(x, weight, None, head_int8, self.lm_head.__dict__.get("packed"))
        else:
            weight, logits = self.lm_head.weight, apply_linear(self.lm_head, x)
        if weight.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            logits = refine_top_logits(logits, x, weight)
        return logits

    def num_parameters(self) -> int:
        """Trainable-parameter count with a tied head counted once (``sum(p.numel())``)."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> GPT:
    """Build a GPT; ``device="meta"`` builds it without allocating memory (for shape checks and counting)."""
    with torch.device(device or "cpu"):
        model = GPT(config)
    if dtype is not None:
        model = model.to(dtype)  # (the RoPE angle tables stay float32: GPT._apply)
    return model
