"""An MoE forward pass for tests, computed without the MoE model or its trunk.

The reference trunk is a dense model of the experts' architecture whose every weight is the
plain mean of the experts' weights, computed here (what the ``average`` trunk method must
produce). Each layer's FFN is replaced by a module that routes by hand (softmax over experts,
top-k, renormalised) and runs each selected expert's FFN from that expert's own dense model.
Only the router weights, which are random inputs rather than results, come from the written
checkpoint.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
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


def averaged_trunk(dense_experts):
    """A new dense model whose every weight is the unweighted mean of the experts' weights."""
    model = type(dense_experts[0])(dense_experts[0].config).eval()
    states = [expert.state_dict() for expert in dense_experts]
    model.load_state_dict(
        {name: torch.stack([s[name] for s in states]).mean(0) for name in states[0]}
    )
    return model


def written_routers(folder, router_name: str, num_layers: int) -> list[torch.Tensor]:
    """Each layer's router weight (experts, hidden) as written in the checkpoint folder."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return [tensors[router_name.format(layer=layer)].float() for layer in range(num_layers)]


class HandRoutedFFN(nn.Module):
    """Routes each token to its top-k experts and mixes their FFN outputs by hand."""

    def __init__(self, router, ffns, top_k: int, shared_ffn=None):
        super().__init__()
        self.router, self.ffns, self.top_k, self.shared_ffn = router, ffns, top_k, shared_ffn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden)
        probs = (hidden @ self.router.T).softmax(-1)  # (batch, tokens, experts)
        top, chosen = probs.topk(self.top_k, dim=-1)  # (batch, tokens, top_k)
        top = top / top.sum(-1, keepdim=True)
        mixed = torch.zeros_like(hidden)
        for expert, ffn in enumerate(self.ffns):
            weight = (top * (chosen == expert)).sum(-1, keepdim=True)  # (batch, tokens, 1)
            mixed = mixed + weight * ffn(hidden)
        if self.shared_ffn is not None:
            # Qwen2-MoE's shared expert behind a zero gate row: sigmoid(0) = 0.5 on every token
            mixed = mixed + 0.5 * self.shared_ffn(hidden)
        return mixed


def reference_logits(dense_experts, routers, ids, top_k, shared_ffns=None):
    """Logits on ``ids`` (batch, tokens) of an MoE with the averaged trunk, the given router
    weights per layer, each expert's own FFN, and per layer an optional shared FFN."""
    model = averaged_trunk(dense_experts)
    for index, layer in enumerate(model.model.layers):
        ffns = [expert.model.layers[index].mlp for expert in dense_experts]
        shared = shared_ffns[index] if shared_ffns is not None else None
        layer.mlp = HandRoutedFFN(routers[index], ffns, top_k, shared)
    return model(ids).logits
