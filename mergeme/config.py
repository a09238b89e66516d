"""The pipeline configuration: a typed schema, validated as a whole.

Every mode is a ``Literal``; unknown keys are refused; all errors are reported at once, each
naming its key. Relative paths resolve against the folder of the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergeme.errors import ConfigError
from mergeme.merge.defaults import (
    DEFAULT_SEED,
    DEFAULT_TIES_AGREEMENT,
    PAPER_DENSITY,
    PAPER_SCALE,
    TiesAgreement,
)

TrunkMethodName = Literal["base", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
RouterMethodName = Literal["centroid", "random", "ppl_probe", "finetune", "ppl_sequence"]
DTypeName = Literal["float32", "bfloat16", "float16"]
OutputDTypeName = Literal["auto", "float32", "bfloat16", "float16"]
SharedExpertMode = Literal["zero", "base_ffn"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSource(StrictModel):
    """A checkpoint folder on this machine."""

    kind: Literal["local"] = "local"
    path: Path


class HuggingFaceSource(StrictModel):
    """A Hugging Face Hub repository at a pinned revision (resolved through the local cache
    when ``offline`` is set)."""

    kind: Literal["huggingface"] = "huggingface"
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    revision: str = Field(min_length=1, description="A commit hash, tag or branch; pin a hash.")
    cache_dir: Path | None = None
    offline: bool = True


class MlflowSource(StrictModel):
    """A registered MLflow model: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""

    kind: Literal["mlflow"] = "mlflow"
    uri: str = Field(pattern=r"^models:/[^/@]+(/\d+|@[\w-]+)$")


Source = Annotated[LocalSource | HuggingFaceSource | MlflowSource, Field(discriminator="kind")]


class ExpertConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Short unique expert name.")
    domain: str = Field(min_length=1, description="The data domain this expert is trained on.")
    source: Source


class BaseModelConfig(StrictModel):
    name: str = "base"
    source: Source


class MergeConfig(StrictModel):
    # the trunk methods' defaults are those of their registry (mergeme.merge.defaults)
    trunk_method: TrunkMethodName = "average"
    density: float = Field(
        PAPER_DENSITY, gt=0.0, le=1.0, description="Share of each task vector kept."
    )
    scale: float = Field(PAPER_SCALE, gt=0.0, description="λ multiplying the merged task vector.")
    ties_agreement: TiesAgreement = DEFAULT_TIES_AGREEMENT
    expert_weights: list[float] | None = None
    seed: int = DEFAULT_SEED
    experts_per_token: int = Field(2, ge=1)
    output_dtype: OutputDTypeName = Field(
        "auto", description="dtype of the MoE's weights; 'auto': the dtype the base stores."
    )
    max_shard_size: int = Field(2 * 1024**3, ge=1024, description="Bytes per output shard.")
    shared_expert: SharedExpertMode = Field(
        "zero",
        description="Qwen2-MoE only: 'zero' adds a shared expert with zero output; 'base_ffn' "
        "uses the base model's FFN as the shared expert, gated.",
    )
    allow_pickle: bool = Field(
        False,
        description="Read pickle .bin checkpoints (with torch.load(weights_only=True)); "
        "refused by default because unpickling can run code.",
    )


class CentroidSettings(StrictModel):
    """``centroid`` routers: what is subtracted from each expert's mean, and when to warn."""

    negative: Literal["none", "other_domains"] = Field(
        "none", description="Subtract the mean of the other experts' centroids from each row."
    )
    negative_weight: float = Field(1.0, ge=0.0, description="Scale of the subtracted mean.")
    max_condition_number: float = Field(
        100.0, gt=1.0, description="Warn when a layer's router matrix is worse conditioned."
    )


class ProbeSettings(StrictModel):
    """``ppl_probe`` routers: a linear classifier per layer from hidden state to best expert."""

    fit: Literal["least_squares", "logistic"] = "logistic"
    ridge: float = Field(1e-3, ge=0.0, description="L2 penalty of the least-squares fit.")
    steps: int = Field(200, ge=1, description="Full-batch optimiser steps of the logistic fit.")
    learning_rate: float = Field(0.05, gt=0.0)


class FinetuneSettings(StrictModel):
    """``finetune``: LM loss plus load-balancing loss, starting from another router method."""

    init: Literal["random", "centroid", "ppl_probe"] = "centroid"
    scope: Literal["routers", "routers_and_trunk", "all"] = "routers"
    steps: int = Field(200, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(8, ge=1)
    load_balancing_coef: float = Field(0.01, ge=0.0, description="α of α·N·Σ uᵢpᵢ per layer.")
    split: str | None = Field(None, description="Training split; default: the calibration one.")
    max_texts_per_domain: int = Field(1000, ge=1)


class SequenceSettings(StrictModel):
    """``ppl_sequence``: the training-free per-sequence perplexity-routed model."""

    top_k: int = Field(2, ge=1, description="Experts that process each sequence.")
    mixing: Literal["layer", "path"] = Field(
        "layer", description="Mix every layer's output, or only the experts' final logits."
    )
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature over 1/PPL.")
    prefix_tokens: int | None = Field(
        None, ge=2, description="Score only the first N tokens of the prompt (default: all)."
    )


class RouterConfig(StrictModel):
    method: RouterMethodName = "centroid"
    max_texts_per_domain: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8, description="Tokens per calibration text.")
    seed: int = 0
    centroid: CentroidSettings = CentroidSettings()
    probe: ProbeSettings = ProbeSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    sequence: SequenceSettings = SequenceSettings()


class DataConfig(StrictModel):
    root: Path = Field(description="Folder with <domain>/<split>.jsonl files.")
    calibration_split: str = "calibration"
    eval_split: str = "eval"
    dvc_lock: Path | None = Field(None, description="dvc.lock whose md5s identify the data.")
    dvc_stage: str = "data"
    allow_uncommitted: bool = Field(
        False, description="Accept data files that differ from the md5s in dvc_lock."
    )


class ValidationConfig(StrictModel):
    """Limits and permissions of the validate step."""

    allowed_dtypes: list[Literal["F32", "BF16", "F16"]] = Field(
        ["F32", "BF16", "F16"], min_length=1, description="Safetensors dtypes a weight may have."
    )
    max_relative_task_vector: float = Field(
        1.2, gt=0.0, description="Largest ‖θ_expert − θ_base‖ / ‖θ_base‖ of a fine-tune."
    )
    allow_remote_code: bool = Field(
        False, description="Accept checkpoints whose config.json needs custom code (auto_map)."
    )
    min_text_chars: int = Field(1, ge=1, description="Shortest calibration or eval text.")
    max_text_chars: int = Field(20_000, ge=1, description="Longest calibration or eval text.")

    @model_validator(mode="after")
    def _check_bounds(self) -> ValidationConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(
                f"validation.min_text_chars {self.min_text_chars} is above max_text_chars "
                f"{self.max_text_chars}; lower min_text_chars or raise max_text_chars"
            )
        return self


class EvaluateConfig(StrictModel):
    max_texts_per_domain: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)


class RegistryConfig(StrictModel):
    model_name: str = Field(pattern=r"^[\w.-]+$")
    experiment: str = "mergeme"
    alias: str = Field("candidate", pattern=r"^[A-Za-z][\w-]*$")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a sqlite store in the workspace."
    )


class PipelineConfig(StrictModel):
    """A whole pipeline run: which experts, how to merge and route, which data, where to
    register."""

    base: BaseModelConfig
    experts: list[ExpertConfig] = Field(min_length=2)
    merge: MergeConfig = MergeConfig()
    router: RouterConfig = RouterConfig()
    data: DataConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> PipelineConfig:
        problems = []
        names = [expert.name for expert in self.experts]
        if len(set(names)) != len(names):
            problems.append(f"experts: names must be unique, got {names}")
        weights = self.merge.expert_weights
        if weights is not None and len(weights) != len(self.experts):
            problems.append(
                f"merge.expert_weights: {len(weights)} weights for {len(self.experts)} experts; "
                "give one weight per expert or remove the key"
            )
        if self.merge.experts_per_token > len(self.experts):
            problems.append(
                f"merge.experts_per_token: {self.merge.experts_per_token} is more than the "
                f"{len(self.experts)} experts; set it to at most {len(self.experts)}"
            )
        if self.router.sequence.top_k > len(self.experts):
            problems.append(
                f"router.sequence.top_k: {self.router.sequence.top_k} is more than the "
                f"{len(self.experts)} experts; set it to at most {len(self.experts)}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def domains(self) -> list[str]:
        return sorted({expert.domain for expert in self.experts})


def _resolve_paths(raw: object, root: Path, key: str = "") -> object:
    """Resolve relative paths of path-like keys against ``root`` (the config's folder)."""
    path_keys = {"path", "root", "dvc_lock", "cache_dir"}
    if isinstance(raw, dict):
        return {
            k: (
                str((root / Path(v).expanduser()).resolve())
                if k in path_keys and isinstance(v, str)
                else _resolve_paths(v, root, k)
            )
            for k, v in raw.items()
        }
    if isinstance(raw, list):
        return [_resolve_paths(item, root, key) for item in raw]
    return raw


# what to write instead, for the common wrong-type errors (the value itself is not echoed:
# it may be a secret)
TYPE_FIXES = {
    "int_parsing": "write a whole number",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number",
    "bool_parsing": "write true or false",
    "string_type": "write a quoted string",
    "list_type": "write a list ([a, b])",
    "model_type": "write a mapping of keys",
    "dict_type": "write a mapping of keys",
}


def format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {error.error_count()} problem(s) in the configuration:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling"
        elif item["type"] == "missing":
            message = "required key is missing; add it"
        elif item["type"] in TYPE_FIXES:
            message = f"{message}; {TYPE_FIXES[item['type']]}"
        lines.append(f"  - {key}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path, base_dir: Path | None = None) -> PipelineConfig:
    """Load and validate a pipeline config file.

    Relative paths in it resolve against ``base_dir`` (default: the repository root if the
    file is in ``configs/``, else the file's own folder).

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation (all problems listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    if base_dir is None:
        folder = path.resolve().parent
        base_dir = folder.parent if folder.name == "configs" else folder
    try:
        return PipelineConfig.model_validate(_resolve_paths(raw, base_dir))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
