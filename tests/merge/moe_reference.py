"""A hand-routed MoE forward pass for tests, computed from the dense experts' own FFNs.

It uses the MoE only for its trunk (embeddings, attention, norms, head) and router weights;
each routed expert's output comes from the dense model it was built from, and the routing
(softmax over experts, top-k, renormalised) is computed here.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def random_dense(config, seed: int):
    """A random dense model of ``config`` whose norms and biases are not their init values."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def perturbed_copy(model, seed: int, scale: float = 0.2):
    """A copy of ``model`` with seeded noise on every weight: a stand-in fine-tune."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return copy


def _router_and_block(layer):
    block = getattr(layer, "block_sparse_moe", None) or layer.mlp
    return block, block.gate.weight  # (experts, hidden)


def reference_logits(dense_experts, moe, ids, top_k, shared_ffns=None):
    """Logits of ``moe`` on ``ids`` (batch, tokens), with every expert's FFN run from its dense
    model and routing done by hand. ``shared_ffns``: per layer, a module added to every token
    scaled by ``sigmoid(shared_expert_gate · x)`` (Qwen2-MoE's shared expert), or None."""
    trunk = moe.model
    hidden = trunk.embed_tokens(ids)  # (batch, tokens, hidden)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    position_embeddings = trunk.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for index, layer in enumerate(trunk.layers):
        attn_out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden),
            position_embeddings=position_embeddings,
            attention_mask=mask,
        )
        hidden = hidden + attn_out
        normed = layer.post_attention_layernorm(hidden)  # (batch, tokens, hidden)
        block, router = _router_and_block(layer)
        probs = (normed @ router.T).softmax(-1)  # (batch, tokens, experts)
        top, chosen = probs.topk(top_k, dim=-1)  # (batch, tokens, top_k)
        top = top / top.sum(-1, keepdim=True)
        mixed = torch.zeros_like(hidden)
        for expert, dense in enumerate(dense_experts):
            ffn_out = dense.model.layers[index].mlp(normed)  # (batch, tokens, hidden)
            weight = (top * (chosen == expert)).sum(-1, keepdim=True)  # (batch, tokens, 1)
            mixed = mixed + weight * ffn_out
        if shared_ffns is not None:
            scale = torch.sigmoid(normed @ block.shared_expert_gate.weight.T)  # (b, t, 1)
            mixed = mixed + scale * shared_ffns[index](normed)
        hidden = hidden + mixed
    return moe.lm_head(trunk.norm(hidden))
