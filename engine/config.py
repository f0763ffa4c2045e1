"""Model configuration: one frozen dataclass for both families, plus named presets.

The GPT-2 family (Radford et al. 2019; Raschka, *Build a Large Language Model (From Scratch)*, ch. 4) uses learned
absolute positions, LayerNorm and a GELU MLP. The Llama-style family (Burkov, *The Hundred-Page Language Models
Book*, ch. 4) uses RoPE, RMSNorm, a SwiGLU MLP and grouped-query attention. Both are described by the same fields,
so a manifest's ``config`` dict round-trips through :meth:`ModelConfig.to_dict` / :meth:`ModelConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBS = ("learned", "rope")
FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters. Runtime knobs (sampling, training) live elsewhere."""

    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos_emb: str = "learned"
    rope_base: float = 10000.0
    rope_scaling: float | None = None
    """Linear position-interpolation factor for RoPE (positions are divided by it); None means none."""
    norm_eps: float = 1e-5
    bias: bool = True
    """Bias on the attention output projection, the MLP linears and the LayerNorm shift (GPT-2: True)."""
    qkv_bias: bool = True
    """Bias on the q/k/v projections. OpenAI GPT-2 has it; the book's from-scratch 124M config does not."""
    tie_embeddings: bool = True
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches, active only in training mode."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"pos_emb must be one of {POS_EMBS}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def family(self) -> str:
        return "gpt2" if self.pos_emb == "learned" else "llama"

    def num_parameters(self, *, count_tied_head: bool = False) -> int:
        """Closed-form parameter count.

        Args:
            count_tied_head: count the output head separately even when it is tied to the token embedding, as the
                book's "total parameters" does (1,637,792,000 for gpt2-xl with qkv_bias=False).
        """
        d, f, hd = self.d_model, self.ffn_dim, self.head_dim
        kv = self.n_kv_heads * hd
        attn = d * d + 2 * d * kv + d * d  # q, k, v, o weights
        if self.qkv_bias:
            attn += d + 2 * kv
        if self.bias:
            attn += d
        n_lin = 3 if self.mlp == "swiglu" else 2
        mlp = n_lin * d * f
        if self.bias:
            mlp += (f + d) if self.mlp == "gelu" else (2 * f + d)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        block = attn + mlp + 2 * norm
        total = self.vocab_size * d + self.n_layers * block + norm
        if self.pos_emb == "learned":
            total += self.context_length * d
        if count_tied_head or not self.tie_embeddings:
            total += self.vocab_size * d
        return total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a manifest ``config`` dict; unknown keys are an error so that typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Look up a preset by exact name, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=50257, context_length=1024, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_heads, ffn_dim=4 * d_model, norm="layernorm", mlp="gelu", pos_emb="learned",
        norm_eps=1e-5, bias=True, qkv_bias=True, tie_embeddings=True,
    )


PRESETS: dict[str, ModelConfig] = {
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
        norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_base=100000.0, norm_eps=1e-5, bias=False,
        qkv_bias=False, tie_embeddings=True,
    ),
}
"""Named presets. OpenAI's GPT-2 sizes carry qkv biases; pass ``qkv_bias=False`` for the book's from-scratch 124M."""
