"""Keep secrets out of MLflow params, tags and logs.

A value is hidden when its key names a secret (``hf_token``, ``password``, ``api_key``, ...),
when it contains a known token format (Hugging Face, GitHub, AWS access key) or the value of a
secret environment variable, and a URI's ``user:password@`` keeps only the user.
"""

from __future__ import annotations

import os
import re

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
