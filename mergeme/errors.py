"""Errors that mergeme raises on bad input.

Every message names the file, tensor, key or row at fault and says what to do about it.
"""


class MergemeError(Exception):
    """Base class of every error mergeme raises on purpose."""


class ConfigError(MergemeError):
    """A pipeline or merge configuration is invalid; the message lists every bad key."""


class CheckpointError(MergemeError):
    """A checkpoint folder is missing, unreadable, incomplete or incompatible."""


class DataError(MergemeError):
    """A calibration or evaluation data file is missing or malformed."""


class SourceError(MergemeError):
    """An expert source (local path, Hugging Face repo, MLflow model) cannot be resolved."""


class UnsupportedArchitectureError(MergemeError):
    """The experts' architecture has no MoE output family in mergeme."""


class RegistryUnavailable(MergemeError):
    """The MLflow tracking server or registry did not answer; retrying may help."""


class RegistryError(MergemeError):
    """The MLflow tracking store or registry refused a request (not an outage)."""


class PromotionRefused(MergemeError):
    """A release failed the promotion policy; the message names each failed check."""
