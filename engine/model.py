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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.kv_cache import AttentionPlan, KVCache

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
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).to(self.weight.dtype)


class RMSNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight; no mean subtraction, no bias (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(self.weight.dtype)  # feeds a matmul: the weights' dtype


def build_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.bias)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) ~= 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); torch's fused kernel computes this exact formula."""
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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                plan: AttentionPlan | None, lora: LoraHook | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if lora is not None:
            q, k, v = lora(self.layer_idx, "q_proj", x, q), lora(self.layer_idx, "k_proj", x, k), \
                lora(self.layer_idx, "v_proj", x, v)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:  # RoPE on queries and keys only, never values
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, is_causal = None, True
        if cache is not None:
            k, v = cache.write(self.layer_idx, plan, k, v)  # (B, n_kv_heads, span, head_dim)
            mask, is_causal = plan.mask, plan.is_causal
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)
        out = self.o_proj(y)
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

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        i = self.layer_idx
        up = self.up_proj(x)
        if lora is not None:
            up = lora(i, "up_proj", x, up)
        if self.swiglu:
            gate = self.gate_proj(x)
            if lora is not None:
                gate = lora(i, "gate_proj", x, gate)
            h = F.silu(gate) * up
        else:
            h = gelu_tanh(up)
        out = self.down_proj(h)
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
                plan: AttentionPlan | None, lora: LoraHook | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, plan, lora))
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
    ) -> torch.Tensor:
        """Run the model.

        Args:
            idx: (B, T) token ids.
            cache: optional KV cache with B rows; new keys/values are written in place and its lengths advance.
            positions: optional (B, T) or (T,) absolute positions of the new tokens. Defaults to continuing each
                cache row, or to ``0..T-1`` without a cache.
            lora: optional per-request LoRA hook (see :mod:`engine.lora`).
            last_only: return logits for the last position only, (B, 1, vocab_size), which saves the head's
                (T x vocab) matmul during prefill.

        Returns:
            logits (B, T, vocab_size), or (B, 1, vocab_size) with ``last_only``.
        """
        B, T = idx.shape
        plan = None
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache has {cache.batch_size} rows but the input has batch size {B}")
            plan = cache.plan(T, positions)
            positions = plan.positions
        elif positions is None:
            if T > self.config.context_length:
                raise ValueError(f"sequence of {T} tokens exceeds context_length={self.config.context_length}")
            positions = torch.arange(T)
        positions = positions.to(idx.device)
        if int(positions.max()) >= self.config.context_length:
            raise ValueError(f"position {int(positions.max())} is past context_length={self.config.context_length}")

        # The residual stream is kept in float32 whatever the weights' dtype: SmolLM2's activations reach ~2.5e4,
        # where a bf16 ulp is 128, and a bf16 residual stream turned its answer to "What is the capital of France?"
        # into noise. Norm outputs (the matmul inputs) and attention/MLP outputs are in the weights' dtype.
        x = self.tok_emb(idx).float()  # (B, T, d_model)
        dtype = self.tok_emb.weight.dtype
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # (T, d) or (B, T, d) broadcast over the batch
        else:
            pos = positions if positions.dim() == 2 else positions[None]
            # (B|1, 1, T, head_dim) in the weights' dtype, broadcast over heads
            rope = (self.rope_cos[pos][:, None].to(dtype), self.rope_sin[pos][:, None].to(dtype))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, plan, lora)
        if cache is not None:
            cache.commit(plan)
        if last_only:
            x = x[:, -1:]
        x = self.norm_f(x)
        if self.lm_head is None:
            return F.linear(x, self.tok_emb.weight)
        return self.lm_head(x)

    def num_parameters(self) -> int:
        """Trainable-parameter count with a tied head counted once (``sum(p.numel())``)."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> GPT:
    """Build a GPT; ``device="meta"`` builds it without allocating memory (for shape checks and counting)."""
    with torch.device(device or "cpu"):
        model = GPT(config)
    if dtype is not None:
        model = model.to(dtype)
        if config.pos_emb == "rope":  # keep the angle tables in float32
            model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model
