"""Checkpoint content hashes (weights, config, tokenizer) and the workspace's file hash cache."""

from __future__ import annotations

import json
import os
import shutil

from mergeme.checkpoint import hash_checkpoint, hash_weight_files
from mergeme.config import load_config
from mergeme.file_hashes import CACHE_FILE, FileHashCache
from mergeme.pipeline import fetch_step
from tests.conftest import write_pipeline_config


def _copy(tiny_family, tmp_path):
    return shutil.copytree(tiny_family.experts["math"], tmp_path / "math")


def test_config_and_tokenizer_edits_change_the_content_hash_only(tiny_family, tmp_path):
    folder = _copy(tiny_family, tmp_path)
    content, weights = hash_checkpoint(folder), hash_weight_files(folder)
    assert content != weights  # the content hash covers more files

    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        file = folder / name
        original = file.read_text()
        file.write_text(json.dumps(json.loads(original), indent=3))
        assert hash_checkpoint(folder) != content, name
        assert hash_weight_files(folder) == weights, name
        file.write_text(original)
        assert hash_checkpoint(folder) == content, name


def test_unchanged_files_are_not_read_again(tiny_family, tmp_path):
    folder = _copy(tiny_family, tmp_path)
    store = tmp_path / "hashes.json"
    first = FileHashCache(store)
    remembered = hash_checkpoint(folder, first.digest)
    first.save()
    assert remembered == hash_checkpoint(folder)  # the cache gives what reading gives
    assert folder / "model.safetensors" in first.computed

    again = FileHashCache(store)
    assert hash_checkpoint(folder, again.digest) == remembered
    assert again.computed == []


def test_touched_or_edited_files_are_hashed_again(tiny_family, tmp_path):
    folder = _copy(tiny_family, tmp_path)
    store = tmp_path / "hashes.json"
    cache = FileHashCache(store)
    remembered = hash_checkpoint(folder, cache.digest)
    cache.save()

    # touched: same bytes, a later modification time
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = FileHashCache(store)
    assert hash_checkpoint(folder, touched.digest) == remembered
    assert touched.computed == [weights]
    touched.save()

    # edited: new bytes, read again, a new hash equal to an uncached one
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=2))
    edited = FileHashCache(store)
    changed = hash_checkpoint(folder, edited.digest)
    assert edited.computed == [tokenizer]
    assert changed != remembered and changed == hash_checkpoint(folder)


def test_fetch_step_keeps_its_hashes_in_the_workspace(tiny_family, dvc_project, tmp_path):
    config = load_config(write_pipeline_config(tmp_path, tiny_family, dvc_project))
    workspace = tmp_path / "workspace"
    fetched = fetch_step(config, workspace)
    entries = json.loads((workspace / CACHE_FILE).read_text())
    for item in fetched:
        weights = os.path.join(item["path"], "model.safetensors")
        assert os.path.realpath(weights) in entries
    assert fetch_step(config, workspace) == fetched
