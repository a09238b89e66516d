"""A sequence-level perplexity-routed MoE with separate attention (MergeME's training-free
mode), as a transformers model of mergeme's own.

Every expert keeps its whole dense stack: embeddings, attention, FFN, norms, head. For an
input, every expert scores the prompt; the weights are a softmax over the top-k of 1/PPL,
computed once on the prompt and held fixed while generating. The chosen experts then process
the sequence, and their outputs are mixed with those weights:

- ``mixing="layer"`` (default): the input of every layer is shared; each layer's output is
  the weighted sum of the chosen experts' own layers (attention + FFN), and so are the
  embeddings and the final logits.
- ``mixing="path"``: each chosen expert runs its whole stack alone; the logits are mixed
  (so the experts may differ in depth and width).

Cost: one prefill per expert over the prompt to score it, then k expert stacks per token.
Each chosen expert keeps its own key-value cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

MODEL_TYPE = "mergeme_ppl_moe"
MIXING_MODES = ("layer", "path")


class PplRoutedConfig(PreTrainedConfig):
    """The experts' dense configs and how to route between them.

    Raises:
        ValueError: an unknown mixing mode, or more experts per sequence than experts.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        expert_configs: list[dict] | None = None,
        expert_names: list[str] | None = None,
        experts_per_sequence: int = 2,
        mixing: str = "layer",
        routing_temperature: float = 1.0,
        routing_prefix_tokens: int | None = None,
        **kwargs,
    ):
        self.expert_configs = [dict(item) for item in (expert_configs or [])]
        count = len(self.expert_configs)
        self.expert_names = list(expert_names or [f"expert_{i}" for i in range(count)])
        self.num_experts = count
        self.experts_per_sequence = experts_per_sequence
        self.mixing = mixing
        self.routing_temperature = routing_temperature
        self.routing_prefix_tokens = routing_prefix_tokens
        if mixing not in MIXING_MODES:
            raise ValueError(f"mixing {mixing!r} is unknown; use one of {MIXING_MODES}")
        if count and not 1 <= experts_per_sequence <= count:
            raise ValueError(
                f"experts_per_sequence {experts_per_sequence} must be between 1 and {count}"
            )
        first = self.expert_configs[0] if count else {}
        self.vocab_size = first.get("vocab_size")
        self.hidden_size = first.get("hidden_size")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key not in kwargs and first.get(key) is not None:
                kwargs[key] = first[key]
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def dense_config(self, index: int) -> PreTrainedConfig:
        """Expert ``index``'s own config object."""
        settings = dict(self.expert_configs[index])
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


@dataclass
class PplRoutedOutput(ModelOutput):
    """``routing_weights`` (batch, experts) is zero for experts not chosen; ``expert_losses``
    (batch, experts) is each expert's mean NLL on the prompt, when it was scored here."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: ExpertCaches | None = None
    routing_weights: torch.Tensor | None = None
    expert_losses: torch.Tensor | None = None


class ExpertCaches:
    """One key-value cache per chosen expert, and the routing weights fixed on the prompt."""

    def __init__(self, routing_weights: torch.Tensor):
        self.routing_weights = routing_weights  # (batch, experts)
        self.caches: dict[int, DynamicCache] = {}

    def for_expert(self, index: int, config) -> DynamicCache:
        if index not in self.caches:
            self.caches[index] = DynamicCache(config=config)
        return self.caches[index]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not self.caches:
            return 0
        return next(iter(self.caches.values())).get_seq_length(layer_idx)


def routing_weights_from_losses(
    losses: torch.Tensor, top_k: int, temperature: float = 1.0
) -> torch.Tensor:
    """Softmax over the top-k of 1/PPL = exp(-loss); losses (batch, experts) → weights (batch,
    experts), zero outside the top-k."""
    inverse_perplexity = torch.exp(-losses.float())  # (batch, experts)
    top = inverse_perplexity.topk(top_k, dim=-1)
    weights = torch.softmax(top.values / temperature, dim=-1)  # (batch, top_k)
    return torch.zeros_like(inverse_perplexity).scatter(1, top.indices, weights)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over the real tokens of its row, 0 on left padding:
    (batch, tokens). A left-padded row gets the positions an unpadded run would give it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def first_real_tokens(attention_mask: torch.Tensor, count: int) -> torch.Tensor:
    """The attention mask of each row's first ``count`` real tokens, wherever the padding is:
    (batch, tokens)."""
    running = attention_mask.long().cumsum(-1)  # real tokens so far, per row
    return attention_mask * (running <= count).to(attention_mask.dtype)


def prompt_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per row of a dense causal LM over the real tokens: (batch,).
    Padding may sit on either side. A row with fewer than two real tokens predicts nothing
    and scores 0."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
    ).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # (batch, tokens - 1, vocab)
    nll = -log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()  # (batch, tokens - 1)
    return (nll * valid).sum(1) / valid.sum(1).clamp_min(1)


class PplRoutedPreTrainedModel(PreTrainedModel):
    config_class = PplRoutedConfig
    base_model_prefix = "mergeme_ppl_moe"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True


class PplRoutedForCausalLM(PplRoutedPreTrainedModel, GenerationMixin):
    """Sequence-level perplexity routing over dense experts with separate attention."""

    def __init__(self, config: PplRoutedConfig):
        super().__init__(config)
        dense = [config.dense_config(i) for i in range(config.num_experts)]
        if config.mixing == "layer":
            for key in ("num_hidden_layers", "hidden_size"):
                values = sorted({getattr(item, key) for item in dense})
                if len(values) > 1:
                    raise ValueError(
                        f"mixing 'layer' needs experts of equal {key}, got {values}; "
                        "use mixing 'path'"
                    )
        # the experts' stored configs name the dtype they were saved in; follow the dtype this
        # model is being built in instead (from_pretrained(dtype=...) sets it as the default)
        dtype = torch.get_default_dtype()
        self.experts = nn.ModuleList(
            [
                AutoModelForCausalLM.from_config(item, dtype=dtype, trust_remote_code=False)
                for item in dense
            ]
        )
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds its own cache: one per chosen expert

    def score_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every expert's mean NLL on the prompt (each row's first ``routing_prefix_tokens``
        real tokens, if set): (batch, experts). One prefill per expert."""
        prefix = self.config.routing_prefix_tokens
        if prefix is not None:
            attention_mask = first_real_tokens(attention_mask, prefix)
            # drop the columns after the last prefix token of any row (causal: unseen anyway)
            width = int(attention_mask.nonzero()[:, 1].max()) + 1 if attention_mask.any() else 1
            input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        with torch.no_grad():
            columns = [prompt_losses(e, input_ids, attention_mask) for e in self.experts]
        return torch.stack(columns, dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: ExpertCaches | None = None,
        use_cache: bool | None = None,
        routing_weights: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> PplRoutedOutput:
        """Logits (batch, tokens, vocab) of the routed experts' mix; see the module doc.

        ``routing_weights`` (batch, experts), when given, replaces the scoring of the prompt:
        each row mixes the experts with its own weights, and an expert whose column is zero
        is not run. ``position_ids`` default to positions over each row's real tokens.
        """
        past = cache.get_seq_length() if cache is not None else 0
        device, (batch, tokens) = input_ids.device, input_ids.shape
        if attention_mask is None:  # covers the cached tokens too: (batch, past + tokens)
            attention_mask = torch.ones(batch, past + tokens, dtype=torch.long, device=device)

        # routing: given, or kept in the cache, or scored now on this (prompt) input
        losses = None
        if routing_weights is None and cache is not None:
            routing_weights = cache.routing_weights
        if routing_weights is None:
            losses = self.score_prompt(input_ids, attention_mask)
            routing_weights = routing_weights_from_losses(
                losses, self.config.experts_per_sequence, self.config.routing_temperature
            )
        routing_weights = routing_weights.to(device)
        if use_cache and cache is None:
            cache = ExpertCaches(routing_weights)

        # positions over each row's real tokens, so left padding shifts nothing
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -tokens:]  # (batch, tokens)
        chosen = [i for i in range(self.config.num_experts) if routing_weights[:, i].any()]
        mix = self._mix_layers if self.config.mixing == "layer" else self._mix_paths
        logits = mix(input_ids, attention_mask, position_ids, cache, routing_weights, chosen)

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return PplRoutedOutput(loss, logits, cache, routing_weights, losses)

    def _mix_paths(self, input_ids, attention_mask, position_ids, cache, weights, chosen):
        logits = 0
        for index in chosen:
            expert = self.experts[index]
            expert_cache = cache.for_expert(index, expert.config) if cache else None
            output = expert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=expert_cache,
                use_cache=expert_cache is not None,
            )
            logits = logits + weights[:, index, None, None] * output.logits  # (b, t, vocab)
        return logits

    def _mix_layers(self, input_ids, attention_mask, position_ids, cache, weights, chosen):
        stacks = [self.experts[index].model for index in chosen]
        dtype = stacks[0].embed_tokens.weight.dtype  # mixing in float32 would upcast layers
        alphas = [weights[:, index, None, None].to(dtype) for index in chosen]  # (batch, 1, 1)
        caches = [
            cache.for_expert(index, self.experts[index].config) if cache else None
            for index in chosen
        ]
        hidden = sum(a * s.embed_tokens(input_ids) for a, s in zip(alphas, stacks))

        # masks read the caches' past length: build them before any layer writes to a cache
        masks = [
            create_causal_mask(
                config=stack.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=expert_cache,
                position_ids=position_ids,
            )
            for stack, expert_cache in zip(stacks, caches)
        ]
        rotary = [stack.rotary_emb(hidden, position_ids=position_ids) for stack in stacks]
        for layer in range(stacks[0].config.num_hidden_layers):
            outputs = [
                stack.layers[layer](
                    hidden,
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=expert_cache,
                    use_cache=expert_cache is not None,
                    position_embeddings=rope,
                )
                for stack, mask, expert_cache, rope in zip(stacks, masks, caches, rotary)
            ]
            hidden = sum(a * out for a, out in zip(alphas, outputs))  # (batch, tokens, hidden)
        heads = [self.experts[index].lm_head for index in chosen]
        return sum(a * h(s.norm(hidden)) for a, h, s in zip(alphas, heads, stacks))

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Keep the prompt's routing weights for every later step, cache or not."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, *args, **kwargs
        )
        model_kwargs["routing_weights"] = outputs.routing_weights
        return model_kwargs
