"""The model card: a markdown page, stored inside the logged model, that says what produced a
release (the same facts as its lineage tags and run record)."""

from __future__ import annotations

import json

CARD_FILE = "model_card.md"


def _rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def checkpoints_from_tags(tags: dict[str, str]) -> list[dict[str, str]]:
    """The base and experts recorded in ``mergeme.<role>.<name>.<field>`` tags."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for key, value in tags.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "mergeme" and parts[1] in ("base", "expert"):
            entry = found.setdefault((parts[1], parts[2]), {"role": parts[1], "name": parts[2]})
            entry[parts[3]] = value
    return [found[key] for key in sorted(found, key=lambda k: (k[0] != "base", k[1]))]


def render_model_card(model_name: str, tags: dict[str, str], metrics: dict[str, float]) -> str:
    """Markdown describing the release from its lineage ``tags`` and eval ``metrics``."""
    lines = [
        f"# {model_name}",
        "",
        "A Mixture-of-Experts merged by mergeme from dense fine-tunes of one base model.",
        "",
        "## Checkpoints",
        "",
    ]
    checkpoints = checkpoints_from_tags(tags)
    lines += _rows(
        ("role", "name", "domain", "source", "resolved", "content hash"),
        [
            (
                c["role"],
                c["name"],
                c.get("domain", ""),
                c.get("source", ""),
                c.get("resolved", ""),
                c.get("content_hash", ""),
            )
            for c in checkpoints
        ],
    )
    settings = [
        ("architecture", tags.get("mergeme.architecture", "")),
        ("trunk method", tags.get("mergeme.trunk_method", "")),
        ("trunk parameters", tags.get("mergeme.trunk_parameters", "")),
        ("experts per token", tags.get("mergeme.experts_per_token", "")),
        ("router method", tags.get("mergeme.router_method", "")),
        ("router settings", tags.get("mergeme.router_settings", "")),
    ]
    lines += ["", "## Merge and routing", ""] + _rows(("setting", "value"), settings)
    data_md5 = json.loads(tags.get("mergeme.data_md5", "{}") or "{}")
    provenance = [(f"data md5 ({path})", md5) for path, md5 in data_md5.items()]
    provenance += [
        ("calibration files md5", tags.get("mergeme.calibration_md5", "")),
        ("eval files md5", tags.get("mergeme.eval_md5", "")),
        ("code revision", tags.get("mergeme.code_revision", "")),
        ("code fingerprint", tags.get("mergeme.code_fingerprint", "")),
        ("input fingerprint", tags.get("mergeme.input_fingerprint", "")),
        ("Prefect flow run", tags.get("mergeme.prefect_flow_run_id", "")),
        ("Prefect deployment", tags.get("mergeme.prefect_deployment_id", "")),
    ]
    lines += ["", "## Data and code", ""] + _rows(("fact", "value"), provenance)
    moe = sorted(
        (key.split(".")[-1], value)
        for key, value in metrics.items()
        if key.startswith("eval_loss.moe.")
    )
    lines += ["", "## Evaluation (MoE loss, nats/token; lower is better)", ""]
    lines += _rows(("domain", "loss"), [(domain, f"{loss:.4f}") for domain, loss in moe])
    return "\n".join(lines) + "\n"
