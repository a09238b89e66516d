"""The router methods: one registry entry per way of setting an MoE's routers.

Each entry carries its name, its reference and its defaults as data; ``calibrate.py``
dispatches on the name. Every method but ``ppl_sequence`` writes plain router weights into a
standard MoE checkpoint; ``ppl_sequence`` writes a model of mergeme's own instead
(``mergeme.models.ppl_routed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mergeme.config import (
    CentroidSettings,
    FinetuneSettings,
    ProbeSettings,
    RouterMethodName,
    SequenceSettings,
)


@dataclass(frozen=True)
class RouterMethod:
    name: str
    reference: str
    summary: str
    output: Literal["router_weights", "model"]
    needs_dense_experts: bool
    defaults: dict = field(default_factory=dict)


ROUTER_METHODS: dict[str, RouterMethod] = {
    "random": RouterMethod(
        name="random",
        reference="Sukhbaatar et al. 2024, Branch-Train-MiX, arXiv 2403.07816",
        summary="Seeded normal routers (std = initializer_range), the BTX starting point.",
        output="router_weights",
        needs_dense_experts=False,
        defaults={"seed": 0},
    ),
    "centroid": RouterMethod(
        name="centroid",
        reference="mergekit-moe hidden-state gates (Goddard et al. 2024, arXiv 2403.13257)",
        summary="Per layer, the normalised mean router input of the merged model on each "
        "expert's calibration texts, optionally minus the other experts' mean.",
        output="router_weights",
        needs_dense_experts=False,
        defaults=CentroidSettings().model_dump(),
    ),
    "ppl_probe": RouterMethod(
        name="ppl_probe",
        reference="MergeME perplexity routing (Zhou et al. 2025, arXiv 2502.00997), "
        "distilled into token-level linear routers",
        summary="Label each calibration text with the dense expert of lowest perplexity; fit "
        "each layer's router as a linear classifier from its hidden states to the label.",
        output="router_weights",
        needs_dense_experts=True,
        defaults=ProbeSettings().model_dump(),
    ),
    "finetune": RouterMethod(
        name="finetune",
        reference="Sukhbaatar et al. 2024, Branch-Train-MiX, arXiv 2403.07816",
        summary="Train routers (or routers and trunk, or everything) with the LM loss plus "
        "α·N·Σ uᵢpᵢ load balancing per layer, starting from another method.",
        output="router_weights",
        needs_dense_experts=False,
        defaults=FinetuneSettings().model_dump(),
    ),
    "ppl_sequence": RouterMethod(
        name="ppl_sequence",
        reference="MergeME separate attention + perplexity routing (Zhou et al. 2025, "
        "arXiv 2502.00997)",
        summary="Training-free: every dense expert scores the prompt; softmax over the top-k "
        "of 1/PPL weights the chosen experts, each with its own attention.",
        output="model",
        needs_dense_experts=True,
        defaults=SequenceSettings().model_dump(),
    ),
}


def router_method(name: RouterMethodName) -> RouterMethod:
    """The registry entry of ``name``.

    Raises:
        ValueError: ``name`` is not a router method; the message lists them.
    """
    try:
        return ROUTER_METHODS[name]
    except KeyError:
        raise ValueError(
            f"router method {name!r} is unknown; choose one of {', '.join(ROUTER_METHODS)}"
        ) from None
