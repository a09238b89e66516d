"""Config checks that involve several keys, and the wording of every config error.

Pydantic runs a model's ``mode="after"`` validator only once all of its fields are valid, so a
config with one wrong type would hide every cross-field problem. ``load_config`` therefore runs
the checks here a second time on the raw YAML: each check reads the keys it needs through
``RawConfig``, which validates every such key with that key's own type and constraints, and a
check whose keys are not themselves valid is skipped (their field errors already name them).
The model validators run the same checks on validated data, so a config built in code is
checked too.

Every problem is a ``(dotted key, message)`` pair whose message ends with the fix.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

ConfigIssue = tuple[str, str]  # (dotted key, message with its fix)
CROSS_FIELD_ERROR = "cross_field"
INVALID = object()  # a key whose raw value fails its own field's validation


@cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    field = model.model_fields[name]
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[field.annotation, *field.metadata])


class RawConfig:
    """Typed reads of single keys from a config mapping that may be invalid elsewhere."""

    def __init__(self, root_model: type[BaseModel], raw: dict):
        self.root_model, self.raw = root_model, raw

    def get(self, dotted: str) -> Any:
        """The validated value of ``dotted`` (its default when absent), or ``INVALID``."""
        model, value = self.root_model, self.raw
        *sections, leaf = dotted.split(".")
        for name in sections:
            if not isinstance(value, dict) or name not in model.model_fields:
                return INVALID
            field = model.model_fields[name]
            if name in value:
                value = value[name]
            else:
                default = field.get_default(call_default_factory=True)
                value = default.model_dump() if isinstance(default, BaseModel) else default
            model = field.annotation  # a section is a model class
        if not isinstance(value, dict):
            return INVALID
        if leaf not in value:
            return model.model_fields[leaf].get_default(call_default_factory=True)
        try:
            return _adapter(model, leaf).validate_python(value[leaf])
        except ValidationError:
            return INVALID

    def expert_count(self) -> int | None:
        experts = self.raw.get("experts")
        return len(experts) if isinstance(experts, list) else None


def text_bounds_issues(minimum: Any, maximum: Any) -> list[ConfigIssue]:
    """``validation.min_text_chars`` must not exceed ``max_text_chars``."""
    if minimum is INVALID or maximum is INVALID or minimum <= maximum:
        return []
    return [
        (
            "validation.min_text_chars",
            f"{minimum} is above validation.max_text_chars {maximum}; lower min_text_chars "
            "or raise max_text_chars",
        )
    ]


def _unique_names(config: RawConfig) -> list[ConfigIssue]:
    experts = config.raw.get("experts")
    if not isinstance(experts, list):
        return []
    names = [e["name"] for e in experts if isinstance(e, dict) and isinstance(e.get("name"), str)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not repeated:
        return []
    return [("experts", f"names must be unique, {repeated} repeat; rename the copies")]


def _expert_weights(config: RawConfig) -> list[ConfigIssue]:
    weights, count = config.get("merge.expert_weights"), config.expert_count()
    if weights is INVALID or weights is None or count is None or len(weights) == count:
        return []
    message = f"{len(weights)} weights for {count} experts; give one weight per expert or remove it"
    return [("merge.expert_weights", message)]


def _at_most_experts(config: RawConfig, key: str) -> list[ConfigIssue]:
    value, count = config.get(key), config.expert_count()
    # under 2 experts the count itself is the error (its fix is more experts)
    if value is INVALID or count is None or count < 2 or value <= count:
        return []
    return [(key, f"{value} is more than the {count} experts; set it to at most {count}")]


def cross_field_issues(root_model: type[BaseModel], raw: dict) -> list[ConfigIssue]:
    """Every cross-field problem of ``raw`` whose keys are valid on their own."""
    config = RawConfig(root_model, raw)
    bounds = ("validation.min_text_chars", "validation.max_text_chars")
    return [
        *_unique_names(config),
        *_expert_weights(config),
        *_at_most_experts(config, "merge.experts_per_token"),
        *_at_most_experts(config, "router.sequence.top_k"),
        *text_bounds_issues(*map(config.get, bounds)),
    ]


def raise_issues(issues: list[ConfigIssue]) -> None:
    """Raise the issues from a model validator, marked so that ``load_config`` can replace them
    with the raw-data pass (which names each key)."""
    if issues:
        joined = "; ".join(f"{key}: {message}" for key, message in issues)
        raise PydanticCustomError(CROSS_FIELD_ERROR, "{issues}", {"issues": joined})


# -- wording of pydantic's errors ---------------------------------------------------------

# what to write instead (the value itself is never echoed: it may be a secret)
TYPE_FIXES = {
    "int_parsing": "write a whole number",
    "int_from_float": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "finite_number": "write a finite number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a quoted string",
    "path_type": "write a path",
    "list_type": "write a list ([a, b])",
    "model_type": "write a mapping of keys",
    "model_attributes_type": "write a mapping of keys",
    "dict_type": "write a mapping of keys",
    "literal_error": "write one of the listed values",
    "union_tag_invalid": "set it to one of the listed kinds",
    "union_tag_not_found": "add a kind key: local, huggingface or mlflow",
}
BOUND_FIXES = {
    "too_short": "list at least {min_length} item(s)",
    "too_long": "list at most {max_length} item(s)",
    "string_too_short": "write at least {min_length} character(s)",
    "string_too_long": "write at most {max_length} character(s)",
    "greater_than": "write a number above {gt}",
    "greater_than_equal": "write {ge} or more",
    "less_than": "write a number below {lt}",
    "less_than_equal": "write {le} or less",
}
# the config's patterns, in words
PATTERN_FIXES = {
    r"^[a-z0-9][a-z0-9_-]*$": "use lower-case letters, digits, '_' and '-', starting with a "
    "letter or digit",
    r"^[\w.-]+/[\w.-]+$": "write OWNER/NAME, as on the Hugging Face Hub",
    r"^models:/[^/@]+(/\d+|@[\w-]+)$": "write models:/NAME/VERSION or models:/NAME@ALIAS",
    r"^[\w.-]+$": "use letters, digits, '_', '.' and '-' only",
    r"^[A-Za-z][\w-]*$": "use letters, digits, '_' and '-', starting with a letter",
}
FALLBACK_FIX = "correct the value (the schema's field descriptions say what each key takes)"


def error_fix(item: dict) -> str:
    """The fix for one pydantic error (``ValidationError.errors()`` item)."""
    kind, context = item["type"], item.get("ctx") or {}
    if kind in TYPE_FIXES:
        return TYPE_FIXES[kind]
    if kind in BOUND_FIXES:
        return BOUND_FIXES[kind].format(**context)
    if kind == "string_pattern_mismatch":
        pattern = str(context.get("pattern", ""))
        return PATTERN_FIXES.get(pattern, f"write a value matching the pattern {pattern}")
    return FALLBACK_FIX


def describe_errors(
    error: ValidationError, root_model: type[BaseModel] | None = None, raw: Any = None
) -> list[str]:
    """One ``key: message; fix`` line per problem. Given the ``root_model`` and the ``raw``
    data it validated, the cross-field problems come from a pass over ``raw`` (each under its
    own key, found even where other fields are invalid) instead of the model validators."""
    second_pass = root_model is not None and isinstance(raw, dict)
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == CROSS_FIELD_ERROR:
            if not second_pass:
                lines.append(f"{key}: {item['msg']}")
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling"
        elif item["type"] == "missing":
            message = "required key is missing; add it"
        elif item["type"] == "value_error":
            # a validator's own ValueError already names the fix
            message = item["msg"].removeprefix("Value error, ")
        else:
            message = f"{item['msg']}; {error_fix(item)}"
        lines.append(f"{key}: {message}")
    if second_pass:
        issues = cross_field_issues(root_model, raw)  # type: ignore[arg-type]
        lines += [f"{key}: {message}" for key, message in issues]
    return lines
