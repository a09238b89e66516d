"""Plain-text tables of a pipeline run's results, for the terminal."""

from __future__ import annotations


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded)

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_eval_table(evaluation: dict) -> str:
    """Eval loss per domain (rows) and model (columns), then the MoE's routing shares."""
    models = list(dict.fromkeys(row["model"] for row in evaluation["rows"]))
    domains = list(dict.fromkeys(row["domain"] for row in evaluation["rows"]))
    loss = {(row["model"], row["domain"]): row["loss"] for row in evaluation["rows"]}
    rows = [[domain] + [f"{loss[(m, domain)]:.3f}" for m in models] for domain in domains]
    text = "Eval loss (nats/token; lower is better)\n" + _table(["domain", *models], rows)

    shares = evaluation.get("routing_shares") or {}
    if shares:
        experts = evaluation["experts"]
        share_rows = [[domain] + [f"{share:.0%}" for share in shares[domain]] for domain in shares]
        header = ["domain", *experts]
        text += "\n\nMoE routing: share of each domain's top-k slots per expert\n"
        text += _table(header, share_rows)
    return text


def release_summary(release: dict) -> str:
    """One line: the version registered, or why nothing new was."""
    return format_release(release).splitlines()[0]


def format_release(release: dict) -> str:
    """The registered version and its lineage tags."""
    if release.get("created") is False:
        return (
            f"Inputs unchanged: nothing new registered; {release['model_name']} version "
            f"{release['version']} was built from the same inputs "
            f"(fingerprint {release['tags'].get('mergeme.input_fingerprint')})"
        )
    lines = [
        f"Registered {release['model_name']} version {release['version']} "
        f"(alias {release['alias']}), run {release['run_id']}",
        f"Load it with: mlflow.pyfunc.load_model('models:/{release['model_name']}@"
        f"{release['alias']}')",
        "Lineage:",
    ]
    for key, value in sorted(release["tags"].items()):
        lines.append(f"  {key.removeprefix('mergeme.')}: {value}")
    return "\n".join(lines)
