"""The streaming writer against safetensors' own reader, and the atomic output folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mergeme.checkpoint import Checkpoint
from mergeme.io.atomic import atomic_folder
from mergeme.io.derive import derive_checkpoint
from mergeme.io.safetensors_writer import CheckpointWriter, TensorSpec, plan_shards


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=generator),
        "b.bias": torch.randn(7, generator=generator).to(torch.bfloat16),
        "c.scalar": torch.tensor(2.5, dtype=torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def _write(folder, tensors, max_shard_size, order):
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = CheckpointWriter(folder, specs, max_shard_size)
    for name in order:  # tensors may arrive in any order
        writer.write(name, tensors[name])
    writer.close()
    return writer


def test_single_file_reads_back_identically_with_safetensors(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors, 1 << 20, order=reversed(list(tensors)))

    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_shards_and_index_follow_the_size_limit(tmp_path):
    tensors = _tensors()
    writer = _write(tmp_path, tensors, max_shard_size=60, order=list(tensors))

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    # 60 | 14 + 2 | 48 bytes: the int64 tensor no longer fits beside the two small ones
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == writer.total_size == 60 + 14 + 2 + 48
    for name, tensor in tensors.items():
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)


def test_plan_gives_an_oversized_tensor_its_own_shard():
    specs = [
        TensorSpec("small", torch.float32, (2,)),
        TensorSpec("huge", torch.float32, (100,)),
        TensorSpec("tail", torch.float32, (2,)),
    ]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 64)] == [
        ["small"],
        ["huge"],
        ["tail"],
    ]


def test_writer_refuses_a_tensor_that_differs_from_its_plan(tmp_path):
    specs = [TensorSpec("x", torch.float32, (2, 2))]
    writer = CheckpointWriter(tmp_path, specs, 1 << 20)
    with pytest.raises(ValueError, match="'x' is torch.float16"):
        writer.write("x", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def test_atomic_folder_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as folder:
            (folder / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []

    with atomic_folder(target) as folder:
        (folder / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(target):
            pass


def test_derive_replaces_tensors_and_leaves_the_source_untouched(tmp_path):
    tensors = _tensors()
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    _write(source_dir, tensors, max_shard_size=60, order=list(tensors))
    (source_dir / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in source_dir.iterdir()}

    new_a = torch.ones(3, 5)
    with Checkpoint(source_dir) as source:
        derive_checkpoint(
            source, tmp_path / "dst", {"a.weight": new_a}, {"config.json": '{"x": 1}'}
        )

    with Checkpoint(tmp_path / "dst") as derived:
        assert torch.equal(derived.get("a.weight"), new_a)
        for name in ("b.bias", "c.scalar", "d.ids"):
            assert torch.equal(derived.get(name), tensors[name])
    assert (tmp_path / "dst" / "config.json").read_text() == '{"x": 1}'
    assert {p.name: p.read_bytes() for p in source_dir.iterdir()} == before
