"""Build the demo's training data: three domains (math, code, knowledge) as JSONL splits.

Layout written under the output folder::

    <out>/<domain>/<split>.jsonl   one {"domain": ..., "text": ...} object per line
    <out>/manifest.json            counts per domain and split, the params and the versions used

For the same params, Python version and pycountry version the output is byte-identical.
Run it as ``python -m mergeme.demo.data --params params.yaml --out data/demo``.
"""

import argparse
import json
import logging
import platform
import random
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mergeme.demo.domains import STDLIB_MODULES, code_texts, knowledge_texts, math_texts

logger = logging.getLogger(__name__)

Domain = Literal["math", "code", "knowledge"]
Split = Literal["train", "calibration", "eval"]
DOMAINS: tuple[Domain, ...] = ("math", "code", "knowledge")
SPLITS: tuple[Split, ...] = ("train", "calibration", "eval")
MANIFEST = "manifest.json"


class DemoDataParams(BaseModel):
    """The ``data:`` section of the demo's params file; sizes are texts per domain and split."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(description="seed of the math generator and of every split shuffle")
    train_size: int = Field(ge=1, description="texts per domain in train.jsonl")
    calibration_size: int = Field(ge=1, description="texts per domain in calibration.jsonl")
    eval_size: int = Field(ge=1, description="texts per domain in eval.jsonl")
    max_chars: int = Field(ge=64, description="upper bound on the length of one text")

    @property
    def total_size(self) -> int:
        return self.train_size + self.calibration_size + self.eval_size


def load_params(path: Path) -> DemoDataParams:
    """Read and validate the ``data:`` section of a YAML params file.

    Raises:
        ValueError: the file has no ``data:`` mapping, or a key in it is missing, unknown or out
            of range (pydantic's ``ValidationError`` is a ``ValueError`` and names the key).
    """
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    section = document.get("data") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{path} has no 'data:' mapping; add one with the keys of DemoDataParams")
    return DemoDataParams.model_validate(section)


def build_demo_data(params: DemoDataParams, out: Path) -> dict[str, Any]:
    """Write every domain's train, calibration and eval splits and the manifest under ``out``.

    An existing ``out`` is replaced. Files are written into a temporary folder next to ``out``
    and moved into place at the end, so a failure never leaves half-written output behind.

    Returns:
        The manifest, also written to ``out/manifest.json``.

    Raises:
        ValueError: a domain has fewer distinct texts of at most ``max_chars`` than the three
            sizes together; the message names the domain and the keys to change.
    """
    # every domain is built before anything touches the disk, so a short domain writes nothing
    splits = {domain: _split_domain(domain, params) for domain in DOMAINS}
    manifest = {
        "counts": {
            domain: {split: len(texts) for split, texts in domain_splits.items()}
            for domain, domain_splits in splits.items()
        },
        "params": params.model_dump(),
        "pycountry_version": version("pycountry"),
        "python_version": platform.python_version(),
        "stdlib_modules": list(STDLIB_MODULES),
    }

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_output(staging, splits, manifest)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote the demo data to %s", out)
    return manifest


def _split_domain(domain: Domain, params: DemoDataParams) -> dict[Split, list[str]]:
    """Deduplicate a domain's texts, bound their length, shuffle them and cut the three splits."""
    # a string seed is hashed with SHA-512, so it gives the same stream in every process
    rng = random.Random(f"{params.seed}:{domain}")
    if domain == "math":
        candidates = math_texts(rng, params.total_size, params.max_chars)
    elif domain == "code":
        candidates = code_texts(params.max_chars)
    else:
        candidates = knowledge_texts()

    # an exact duplicate could land in two splits and leak eval text into training
    texts = [text for text in dict.fromkeys(candidates) if len(text) <= params.max_chars]
    if len(texts) < params.total_size:
        raise ValueError(
            f"domain {domain!r} has only {len(texts)} distinct texts of at most "
            f"max_chars={params.max_chars} characters, but train_size + calibration_size + "
            f"eval_size = {params.total_size}; lower train_size or raise max_chars"
        )
    rng.shuffle(texts)

    # eval is cut first and train last, so that for code and knowledge (whose pools do not
    # depend on the sizes) a larger train_size leaves eval and calibration as they were
    calibration_start = params.eval_size
    train_start = calibration_start + params.calibration_size
    logger.info("%s: %d distinct texts, %d used", domain, len(texts), params.total_size)
    return {
        "train": texts[train_start : params.total_size],
        "calibration": texts[calibration_start:train_start],
        "eval": texts[:calibration_start],
    }


def _write_output(
    folder: Path, splits: dict[Domain, dict[Split, list[str]]], manifest: dict[str, Any]
) -> None:
    for domain, domain_splits in splits.items():
        (folder / domain).mkdir()
        for split in SPLITS:
            records = [{"domain": domain, "text": text} for text in domain_splits[split]]
            _write_jsonl(folder / domain / f"{split}.jsonl", records)
    manifest_text = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST).write_text(manifest_text, encoding="utf-8", newline="\n")


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, replacing whatever ``out`` was."""
    # mkdtemp creates the folder readable by its owner only; the output is ordinary data
    staging.chmod(0o755)
    if not (out.exists() or out.is_symlink()):
        staging.rename(out)
        return

    # a folder cannot be renamed onto a non-empty one, so the old output steps aside first
    retired = staging.with_name(f"{staging.name}.old")
    out.rename(retired)
    try:
        staging.rename(out)
    except OSError:
        retired.rename(out)
        raise
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired)
    else:
        retired.unlink()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m mergeme.demo.data --params params.yaml --out data/demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m mergeme.demo.data",
        description="Build the demo's math, code and knowledge data as JSONL splits.",
    )
    parser.add_argument(
        "--params", type=Path, required=True, help="YAML file whose data: section holds the params"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder; replaced if it exists"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        build_demo_data(load_params(args.params), args.out)
    except ValueError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
