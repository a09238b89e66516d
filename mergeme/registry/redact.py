"""Keep secrets out of MLflow params, tags and logs.

A value is hidden when its key names a secret (``hf_token``, ``password``, ``api_key``, ...),
when it contains a known token format (Hugging Face, GitHub, AWS access key) or the value of a
secret environment variable, and a URI's ``user:password@`` keeps only the user. Nested data
(a YAML config) is redacted the same way, key by key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

REDACTED = "***"
SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "credential", "credentials", "apikey"}
)
# "experts_per_token" or "max_tokens" count tokens; they are not secrets
COUNTING_WORDS = frozenset({"per", "max", "min", "num"})
SECRET_ENVIRONMENT = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
)
URI_PASSWORD = re.compile(
    r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):(?P<password>[^/@\s]+)@"
)
TOKEN_FORMATS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\b(?:ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
)


def is_secret_key(key: str) -> bool:
    """``key`` (possibly dotted, ``registry.hf_token``) names a secret."""
    words = re.split(r"[_\-]", key.rsplit(".", 1)[-1].lower())
    if key.lower().endswith(("api_key", "api-key")):
        return True
    return words[-1] in SECRET_WORDS and not (len(words) > 1 and words[-2] in COUNTING_WORDS)


def redact_text(text: str) -> str:
    """``text`` with URI passwords, known token formats and secret environment values hidden."""
    text = URI_PASSWORD.sub(lambda m: f"{m.group('prefix')}:{REDACTED}@", text)
    for pattern in TOKEN_FORMATS:
        text = pattern.sub(REDACTED, text)
    for name in SECRET_ENVIRONMENT:
        value = os.environ.get(name, "")
        if len(value) >= 8:  # a short value would blank out ordinary words
            text = text.replace(value, REDACTED)
    return text


def redact_mapping(values: dict[str, object]) -> dict[str, str]:
    """MLflow-ready ``{key: text}`` with every secret hidden (the keys are kept)."""
    return {
        key: REDACTED
        if is_secret_key(key) and value not in (None, "", "None")
        else redact_text(str(value))
        for key, value in values.items()
    }


def redact_tree(value: object, key: str = "") -> object:
    """Nested dicts and lists with every secret hidden; ``key`` is the dotted key of ``value``.
    Keys and non-secret values keep their types."""
    if isinstance(value, dict):
        return {k: redact_tree(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(item, key) for item in value]
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value


def write_redacted_yaml(source: Path, folder: Path) -> Path:
    """Write the YAML file ``source`` with every secret hidden into ``folder`` under the same
    name, as readable YAML (key order kept; comments dropped, since they may hold secrets too).
    Returns the new file."""
    raw = yaml.safe_load(Path(source).read_text())
    target = Path(folder) / Path(source).name
    target.write_text(yaml.safe_dump(redact_tree(raw), sort_keys=False, allow_unicode=True))
    return target
