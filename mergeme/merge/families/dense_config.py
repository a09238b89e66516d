"""The dense experts' ``config.json`` as transformers 5 reads it, without importing it.

Most checkpoints on the Hub were saved by transformers 4: their rope settings are the legacy
``rope_theta`` and ``rope_scaling`` fields, their sliding windows are ``use_sliding_window`` plus
``max_window_layers`` without ``layer_types``, and fields equal to a class default may be missing.
The MoE config classes have other defaults (Mixtral's rope theta is 1e6, Llama's 1e4; Mistral
slides a 4096 window by default, Mixtral does not), so every field that is carried over must be
resolved the way the dense model's own config class resolves it. ``normalise_dense_config`` does
that for the dense types mergeme serves. Importing transformers' config classes would do it as
well, but costs about a second of start-up; a test checks this module against those classes.
"""

from __future__ import annotations

import copy

# transformers 5's defaults of each dense config class, for every field mergeme reads
_LLAMA_LIKE = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "head_dim": None,  # None: hidden_size // num_attention_heads
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}
_QWEN_LIKE = {
    **_LLAMA_LIKE,
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "bos_token_id": None,
    "eos_token_id": None,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
DENSE_DEFAULTS: dict[str, dict] = {
    "llama": {
        **_LLAMA_LIKE,
        "intermediate_size": 11008,
        "num_key_value_heads": None,  # None: num_attention_heads
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        **_LLAMA_LIKE,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,  # every layer; null in config.json turns it off
    },
    "qwen2": {**_QWEN_LIKE},
    "qwen3": {**_QWEN_LIKE, "head_dim": 128, "attention_bias": False},
}
DEFAULT_ROPE_THETA = 10000.0
# rope types whose frequencies depend on the pre-training context length
_LONG_CONTEXT_ROPE = ("llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_parameters(raw: dict, max_position_embeddings: int) -> dict:
    """The ``rope_parameters`` dict transformers 5 builds from a config's rope fields.

    ``rope_scaling`` (legacy) wins over ``rope_parameters``; ``rope_theta`` and
    ``partial_rotary_factor`` fill in what the dict lacks; the type defaults to ``default``
    (or the legacy ``type`` key); long-context types get ``original_max_position_embeddings``.
    """
    params = copy.deepcopy(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if any(key in LAYER_TYPES for key in params):
        return params  # one dict per layer type: unsupported_reason refuses it
    params.setdefault("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA))
    if raw.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _LONG_CONTEXT_ROPE:
        if "original_max_position_embeddings" in raw:
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def _qwen_layer_types(config: dict) -> list[str]:
    # Qwen2 and Qwen3: the layers from max_window_layers on slide, when sliding is on at all
    window = config["sliding_window"]
    return [
        "sliding_attention"
        if window is not None and layer >= config["max_window_layers"]
        else "full_attention"
        for layer in range(config["num_hidden_layers"])
    ]


def normalise_dense_config(raw: dict) -> dict:
    """A copy of the dense ``config.json`` contents with every field mergeme carries resolved.

    Missing fields get the dense class's default; ``head_dim`` and ``num_key_value_heads`` are
    filled in; ``rope_parameters`` is built from legacy fields; for Qwen2 and Qwen3,
    ``sliding_window`` is None unless ``use_sliding_window`` and ``layer_types`` lists every
    layer. Configs of other model types are returned unchanged (a copy).
    """
    defaults = DENSE_DEFAULTS.get(raw.get("model_type"))
    if defaults is None:
        return copy.deepcopy(raw)
    config = {**copy.deepcopy(defaults), **copy.deepcopy(raw)}

    # sizes that default to other sizes
    if config["num_key_value_heads"] is None:
        config["num_key_value_heads"] = config["num_attention_heads"]
    if config["head_dim"] is None:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]

    # rope: one transformers-5 dict; the legacy fields are dropped so nothing reads them
    config["rope_parameters"] = rope_parameters(raw, config["max_position_embeddings"])
    for legacy in ("rope_theta", "rope_scaling"):
        config.pop(legacy, None)

    # sliding windows: Qwen decides per layer, Mistral slides every layer or none
    if "use_sliding_window" in defaults:
        if not config["use_sliding_window"]:
            config["sliding_window"] = None
        if not config.get("layer_types"):
            config["layer_types"] = _qwen_layer_types(config)
        if config["sliding_window"] is None:  # "sliding" layers without a window attend fully
            config["layer_types"] = ["full_attention"] * len(config["layer_types"])
    return config
