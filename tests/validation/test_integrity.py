"""File integrity and data-lock checks computed two ways: our header reader against the
safetensors library, our DVC directory md5 against `dvc repro`'s lock; and the whole validate
step accepts good inputs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from safetensors import safe_open

from mergeme.config import load_config
from mergeme.data import dvc_output_md5s
from mergeme.pipeline import fetch_step
from mergeme.validation.checkpoints import ValidationReport
from mergeme.validation.compatibility import relative_task_vector
from mergeme.validation.dvc_lock import dvc_dir_md5, uncommitted_data_problems
from mergeme.validation.files import inspect_checkpoint, read_safetensors_header
from mergeme.validation.shapes import expected_shapes
from mergeme.validation.step import run_validation, validate_data
from tests.conftest import write_pipeline_config


def test_header_reader_agrees_with_safetensors(tiny_family):
    file = tiny_family.base / "model.safetensors"
    ours = read_safetensors_header(file)
    with safe_open(file, "pt") as handle:
        theirs = {
            name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
            for name in handle.keys()
        }
    assert {name: (entry.dtype, entry.shape) for name, entry in ours.items()} == theirs


def test_config_implies_exactly_the_saved_tensors(tiny_family):
    inventory = inspect_checkpoint("base", tiny_family.base)
    assert inventory.readable and not inventory.problems
    shapes = {name: entry.shape for name, entry in inventory.tensors.items()}
    assert expected_shapes(inventory.config) == shapes


def test_dvc_dir_md5_matches_the_lock_written_by_dvc_repro(dvc_project):
    recorded = dvc_output_md5s(dvc_project / "dvc.lock", "data")
    assert dvc_dir_md5(dvc_project / "data" / "demo") == recorded["data/demo"]
    assert uncommitted_data_problems(dvc_project / "dvc.lock", "data", False) == []


def test_uncommitted_data_names_the_file_and_can_be_accepted(dvc_project, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(dvc_project, copy)
    with open(copy / "data" / "demo" / "code" / "calibration.jsonl", "a") as stream:
        stream.write('{"domain": "code", "text": "pass"}\n')

    [problem] = uncommitted_data_problems(copy / "dvc.lock", "data", False)
    assert problem.kind == "data_uncommitted"
    assert "code/calibration.jsonl" in problem.message
    assert "data.allow_uncommitted: true" in problem.message
    assert uncommitted_data_problems(copy / "dvc.lock", "data", True) == []
    # the md5 we recompute now differs from the lock as well
    recorded = dvc_output_md5s(copy / "dvc.lock", "data")["data/demo"]
    assert dvc_dir_md5(copy / "data" / "demo") != recorded


def test_data_outside_the_locked_outputs_is_untracked(dvc_project, tmp_path):
    lock = dvc_project / "dvc.lock"
    inside = dvc_project / "data" / "demo"
    assert uncommitted_data_problems(lock, "data", False, inside) == []
    assert uncommitted_data_problems(lock, "data", False, inside / "math") == []

    # the same files, copied elsewhere: the lock says nothing about them
    copy = tmp_path / "copy"
    shutil.copytree(inside, copy)
    for allow in (False, True):
        [problem] = uncommitted_data_problems(lock, "data", allow, copy)
        assert problem.kind == "data_untracked"
        assert f"data.root {copy} is not inside any output of stage 'data'" in problem.message
        assert str(inside) in problem.message


def test_a_lock_outside_a_dvc_repository_is_a_named_problem(dvc_project, tmp_path):
    (tmp_path / "loose").mkdir()
    shutil.copy(dvc_project / "dvc.lock", tmp_path / "loose" / "dvc.lock")
    shutil.copytree(dvc_project / "data", tmp_path / "loose" / "data")

    [problem] = uncommitted_data_problems(
        tmp_path / "loose" / "dvc.lock", "data", False, tmp_path / "loose" / "data" / "demo"
    )
    assert problem.kind == "data_lock_unusable"
    assert "is not in a DVC repository" in problem.message and "dvc init" in problem.message


def test_data_without_a_lock_is_accepted_with_a_warning(tiny_family, dvc_project, tmp_path, caplog):
    data = {"root": str(dvc_project / "data" / "demo")}
    config = load_config(write_pipeline_config(tmp_path, tiny_family, dvc_project, data=data))
    report = ValidationReport(success=False)
    with caplog.at_level(logging.WARNING, logger="mergeme.validation.step"):
        validate_data(config, report, tmp_path)
    assert report.problems == []
    assert "data.dvc_lock is not set: the identity of the data under" in caplog.text


def test_fine_tunes_are_far_closer_to_the_base_than_the_limit(tiny_family):
    from mergeme.checkpoint import Checkpoint

    with Checkpoint(tiny_family.base) as base:
        for path in tiny_family.experts.values():
            with Checkpoint(path) as expert:
                assert 0.5 < relative_task_vector(base, expert) < 1.2
        assert relative_task_vector(base, base) == 0.0


def test_the_whole_step_accepts_the_tiny_family_and_its_data(tiny_family, dvc_project, tmp_path):
    config = load_config(write_pipeline_config(tmp_path, tiny_family, dvc_project))
    report = run_validation(fetch_step(config, tmp_path / "ws"), tmp_path / "report", config)
    assert report.success, report.problems
    for evidence in (report.docs_index, report.data_docs_index, report.data_gx_result_json):
        assert evidence and Path(evidence).is_file()


def test_a_sound_sharded_checkpoint_lists_the_same_tensors(tiny_family, tmp_path):
    from tests.validation.corpus import shard

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_family.experts["math"], folder)
    single = inspect_checkpoint("math", folder)
    shard(folder)
    sharded = inspect_checkpoint("math", folder)

    assert sharded.problems == [] and sharded.readable
    assert {n: (e.dtype, e.shape) for n, e in sharded.tensors.items()} == {
        n: (e.dtype, e.shape) for n, e in single.tensors.items()
    }
    assert len({entry.file.name for entry in sharded.tensors.values()}) == 2
