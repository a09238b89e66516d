"""Fetching from each kind of source: a local folder, a Hugging Face cache laid out on disk,
and the MLflow registry."""

from __future__ import annotations

import shutil

import pytest

from mergeme.checkpoint import hash_checkpoint, hash_weight_files
from mergeme.config import HuggingFaceSource, LocalSource, MlflowSource
from mergeme.errors import SourceError
from mergeme.fetch import fetch_checkpoint
from mergeme.registry.checkpoints import register_dense_checkpoint
from mergeme.registry.store import connect

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path, checkpoint):
    """The layout huggingface_hub writes: blobs behind snapshots/<commit>, refs/<branch>."""
    repo = tmp_path / "hub" / "models--acme--tiny-math"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def test_local_source_is_hashed_in_place(tiny_family):
    fetched = fetch_checkpoint(
        "math", "expert", "math", LocalSource(path=tiny_family.experts["math"]), tiny_family.root
    )
    assert fetched.path == str(tiny_family.experts["math"])
    assert fetched.resolved == "local"
    assert fetched.content_hash == hash_checkpoint(tiny_family.experts["math"])
    assert fetched.weights_hash == hash_weight_files(tiny_family.experts["math"])


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(SourceError, match="expert 'x': local folder .*nowhere does not exist"):
        fetch_checkpoint("x", "expert", "d", LocalSource(path=tmp_path / "nowhere"), tmp_path)


@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_hugging_face_source_resolves_offline_to_the_pinned_commit(tiny_family, tmp_path, revision):
    cache = _hub_cache(tmp_path, tiny_family.experts["math"])
    source = HuggingFaceSource(repo_id="acme/tiny-math", revision=revision, cache_dir=cache)

    fetched = fetch_checkpoint("math", "expert", "math", source, tmp_path)

    assert fetched.resolved == COMMIT
    assert fetched.path.endswith(f"snapshots/{COMMIT}")
    assert fetched.content_hash == hash_checkpoint(tiny_family.experts["math"])


def test_hugging_face_revision_missing_from_the_cache_is_a_clear_error(tiny_family, tmp_path):
    cache = _hub_cache(tmp_path, tiny_family.experts["math"])
    source = HuggingFaceSource(repo_id="acme/tiny-math", revision="f" * 40, cache_dir=cache)
    with pytest.raises(SourceError, match="acme/tiny-math@f+: not available offline"):
        fetch_checkpoint("math", "expert", "math", source, tmp_path)


def test_mlflow_source_by_alias_and_version(tiny_family, tmp_path):
    connect(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    folder = tiny_family.experts["code"]
    version, created = register_dense_checkpoint(folder, "tiny-code", "current", "t", tmp_path)
    again, created_again = register_dense_checkpoint(folder, "tiny-code", "current", "t", tmp_path)
    assert (created, created_again) == (True, False) and again == version

    by_alias = fetch_checkpoint(
        "code", "expert", "code", MlflowSource(uri="models:/tiny-code@current"), tmp_path
    )
    by_version = fetch_checkpoint(
        "code", "expert", "code", MlflowSource(uri=f"models:/tiny-code/{version}"), tmp_path
    )
    assert by_alias.resolved == by_version.resolved == f"tiny-code/{version}"
    # the copy downloaded from the registry hashes like the folder that was registered
    assert by_alias.content_hash == hash_checkpoint(folder)
    assert by_alias.weights_hash == hash_weight_files(folder)
    assert (tmp_path / "fetched" / "tiny-code" / version).is_dir()

    with pytest.raises(SourceError, match="models:/tiny-code@nope: not found"):
        fetch_checkpoint("c", "expert", "c", MlflowSource(uri="models:/tiny-code@nope"), tmp_path)
