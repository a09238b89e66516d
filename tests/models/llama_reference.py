"""A Llama forward pass written from the equations, for tests: it reads only an expert's
weights and config, never transformers' modules, so it shares no code with the model under
test. ``layer_mixed_logits`` is MergeME's per-layer mixing written on top of it."""

from __future__ import annotations

import torch
from torch.nn.functional import silu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x (batch, heads, tokens, dim) at integer positions (batch, tokens):
    the pair (x_j, x_{j + dim/2}) turns by the angle position · theta^(-2j/dim)."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions[:, None, :, None].double() * frequencies  # (batch, 1, tokens, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class ReferenceLlama:
    """One dense Llama expert as plain tensors."""

    def __init__(self, model):
        self.config = model.config
        self.weights = {name: value.detach() for name, value in model.state_dict().items()}

    def w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w("model.embed_tokens.weight")[ids]  # (batch, tokens, hidden)

    def attention(self, x, layer: int, positions, mask) -> torch.Tensor:
        c, prefix = self.config, f"model.layers.{layer}.self_attn."
        batch, tokens, _ = x.shape
        heads, groups, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = (x @ self.w(prefix + "q_proj.weight").T).view(batch, tokens, heads, dim)
        k = (x @ self.w(prefix + "k_proj.weight").T).view(batch, tokens, groups, dim)
        v = (x @ self.w(prefix + "v_proj.weight").T).view(batch, tokens, groups, dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads or groups, t, dim)
        theta = c.rope_parameters["rope_theta"]
        q, k = rotate(q, positions, theta), rotate(k, positions, theta)
        # query head h reads key/value group h // (heads / groups)
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
        scores = q @ k.transpose(-1, -2) / dim**0.5  # (batch, heads, t, t)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1).nan_to_num() @ v  # (batch, heads, t, dim)
        return out.transpose(1, 2).reshape(batch, tokens, -1) @ self.w(prefix + "o_proj.weight").T

    def layer(self, x, layer: int, positions, mask) -> torch.Tensor:
        prefix, eps = f"model.layers.{layer}.", self.config.rms_norm_eps
        x = x + self.attention(
            rms_norm(x, self.w(prefix + "input_layernorm.weight"), eps), layer, positions, mask
        )
        h = rms_norm(x, self.w(prefix + "post_attention_layernorm.weight"), eps)
        gate, up = (
            h @ self.w(prefix + "mlp.gate_proj.weight").T,
            h @ self.w(prefix + "mlp.up_proj.weight").T,
        )
        return x + (silu(gate) * up) @ self.w(prefix + "mlp.down_proj.weight").T

    def head(self, x) -> torch.Tensor:
        x = rms_norm(x, self.w("model.norm.weight"), self.config.rms_norm_eps)
        return x @ self.w("lm_head.weight").T  # (batch, tokens, vocab)


def attention_mask_of(padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, positions) from a padding mask (batch, tokens): a query attends to the real keys
    at or before it; positions count the real tokens of each row."""
    real = padding.bool()
    tokens = real.shape[1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    mask = causal[None] & real[:, None, :]  # (batch, query, key)
    positions = (padding.long().cumsum(-1) - 1).clamp_min(0)
    return mask, positions


def layer_mixed_logits(
    experts: list[ReferenceLlama], alphas: torch.Tensor, ids: torch.Tensor, padding=None
) -> torch.Tensor:
    """Per-layer mixing: h⁰ = Σᵢ αᵢ Eᵢ[ids]; hˡ⁺¹ = Σᵢ αᵢ layerᵢˡ(hˡ); logits = Σᵢ αᵢ headᵢ(hᴸ).
    alphas (batch, experts); returns (batch, tokens, vocab)."""
    padding = torch.ones_like(ids) if padding is None else padding
    mask, positions = attention_mask_of(padding)
    weight = [alphas[:, i, None, None] for i in range(len(experts))]  # each (batch, 1, 1)
    hidden = sum(a * e.embed(ids) for a, e in zip(weight, experts))
    for layer in range(experts[0].config.num_hidden_layers):
        hidden = sum(a * e.layer(hidden, layer, positions, mask) for a, e in zip(weight, experts))
    return sum(a * e.head(hidden) for a, e in zip(weight, experts))
