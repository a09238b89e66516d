"""mergeme's own transformers model classes, registered with the Auto classes on import so
that ``AutoConfig``/``AutoModelForCausalLM.from_pretrained`` load them."""

from transformers import AutoConfig, AutoModelForCausalLM

from mergeme.models.ppl_routed import MODEL_TYPE, PplRoutedConfig, PplRoutedForCausalLM

AutoConfig.register(MODEL_TYPE, PplRoutedConfig, exist_ok=True)
AutoModelForCausalLM.register(PplRoutedConfig, PplRoutedForCausalLM, exist_ok=True)

__all__ = ["PplRoutedConfig", "PplRoutedForCausalLM"]
