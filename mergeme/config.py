"""The pipeline configuration: a typed schema, validated as a whole.

Every mode is a ``Literal``; unknown keys are refused; all errors are reported at once, each
naming its key and the fix, cross-field ones included (``mergeme.config_checks``). Relative
paths resolve against the folder of the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mergeme.config_checks import (
    cross_field_issues,
    describe_errors,
    raise_issues,
    text_bounds_issues,
)
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
# the float safetensors dtypes the merge can read (integer and 8-bit float weights cannot be
# averaged without their quantisation scales)
WeightDType = Literal["F64", "F32", "BF16", "F16"]


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


# names the pipeline gives models of its own: an expert or base of that name would collide
RESERVED_MODEL_NAMES = ("moe",)


def _refuse_reserved_name(name: str) -> str:
    if name in RESERVED_MODEL_NAMES:
        raise ValueError(
            f"the name {name!r} is reserved for the merged model in evaluation tables and "
            "metrics; rename this model"
        )
    return name


class ExpertConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Short unique expert name.")
    domain: str = Field(min_length=1, description="The data domain this expert is trained on.")
    source: Source

    _check_name = field_validator("name")(_refuse_reserved_name)


class BaseModelConfig(StrictModel):
    name: str = "base"
    source: Source

    _check_name = field_validator("name")(_refuse_reserved_name)


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


class NegativeTextsConfig(StrictModel):
    """Texts that no expert should be chosen for (like mergekit's negative prompts)."""

    path: Path = Field(
        description="A .jsonl file with a 'text' field on every line, or a .txt file with one "
        "text per line."
    )
    max_texts: int = Field(256, ge=1, description="Use at most this many texts of the file.")


class CentroidSettings(StrictModel):
    """``centroid`` routers: what is subtracted from each expert's mean, and when to warn."""

    negative: Literal["none", "other_domains", "texts"] = Field(
        "none",
        description="Subtract from each row the mean of the other experts' centroids "
        "('other_domains') or the centroid of negative_texts ('texts').",
    )
    negative_weight: float = Field(1.0, ge=0.0, description="Scale of the subtracted mean.")
    negative_texts: NegativeTextsConfig | None = Field(
        None, description="The negative text set of negative: texts."
    )
    max_condition_number: float = Field(
        100.0,
        gt=1.0,
        description="Warn when a layer's router matrix is worse conditioned (every router "
        "method that writes router weights).",
    )

    @model_validator(mode="after")
    def _check_negative_texts(self) -> CentroidSettings:
        if self.negative == "texts" and self.negative_texts is None:
            raise ValueError(
                "router.centroid.negative_texts is required when negative is 'texts'; give "
                "negative_texts: {path: FILE.jsonl} or choose another negative"
            )
        if self.negative != "texts" and self.negative_texts is not None:
            raise ValueError(
                f"router.centroid.negative_texts is set but negative is {self.negative!r}, so "
                "it would be ignored; set negative: texts or remove negative_texts"
            )
        return self


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
        None,
        ge=2,
        description="Score only each row's first N real tokens of the prompt (default: all).",
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

    allowed_dtypes: list[WeightDType] = Field(
        ["F32", "BF16", "F16"],
        min_length=1,
        description="Safetensors dtypes a weight may have (merge arithmetic runs in float32).",
    )
    max_abs_value: float = Field(
        1e4,
        gt=0.0,
        allow_inf_nan=False,
        description="Largest |weight| accepted; larger ones suggest diverged training or a broken "
        "conversion.",
    )
    max_relative_task_vector: float = Field(
        1.2, gt=0.0, description="Largest ‖θ_expert − θ_base‖ / ‖θ_base‖ of a fine-tune."
    )
    allow_remote_code: bool = Field(
        False,
        description="Accept, with a warning, checkpoints whose config files name custom code "
        "(auto_map). mergeme never runs that code: every load passes trust_remote_code=False "
        "and uses the built-in class of the checkpoint's model_type.",
    )
    min_text_chars: int = Field(1, ge=1, description="Shortest calibration or eval text.")
    max_text_chars: int = Field(20_000, ge=1, description="Longest calibration or eval text.")

    @model_validator(mode="after")
    def _check_bounds(self) -> ValidationConfig:
        raise_issues(text_bounds_issues(self.min_text_chars, self.max_text_chars))
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
        # the same checks run on the raw YAML in load_config, where fields may be invalid
        raise_issues(cross_field_issues(PipelineConfig, self.model_dump()))
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


def format_validation_error(
    error: ValidationError, origin: str, root_model: type[BaseModel] | None = None, raw=None
) -> str:
    """All problems of ``error`` in one message, one ``key: problem; fix`` line each (with
    ``root_model`` and ``raw``, cross-field problems too; see ``mergeme.config_checks``)."""
    lines = describe_errors(error, root_model, raw)
    header = f"{origin}: {len(lines)} problem(s) in the configuration:"
    return "\n".join([header, *(f"  - {line}" for line in lines)])


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
    resolved = _resolve_paths(raw, base_dir)
    try:
        return PipelineConfig.model_validate(resolved)
    except ValidationError as exc:
        message = format_validation_error(exc, str(path), PipelineConfig, resolved)
        raise ConfigError(message) from exc
