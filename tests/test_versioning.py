"""Step fingerprints and the clean-up of half-written folders."""

from __future__ import annotations

from mergeme import versioning
from mergeme.config import load_config
from mergeme.io.atomic import atomic_folder
from tests.conftest import write_pipeline_config


def test_each_step_has_its_own_code_version():
    versions = {step: versioning.code_version(step) for step in versioning.STEP_SOURCES}
    assert len(set(versions.values())) == len(versions)


def test_fingerprints_follow_the_inputs(tiny_family, dvc_project, tmp_path):
    config = load_config(write_pipeline_config(tmp_path, tiny_family, dvc_project))
    fetched = [{"role": "base", "name": "base", "content_hash": "a"}]
    merge = versioning.merge_fingerprint(config, fetched)
    changed = [{**fetched[0], "content_hash": "b"}]
    assert versioning.merge_fingerprint(config, changed) != merge
    stronger = config.model_copy(update={"merge": config.merge.model_copy(update={"seed": 9})})
    assert versioning.merge_fingerprint(stronger, fetched) != merge
    assert versioning.merge_fingerprint(config, fetched) == merge

    calibration = versioning.split_md5s(config, "calibration")
    assert set(calibration) == set(config.domains())
    assert all(len(md5) == 32 for md5 in calibration.values())


def test_clean_stale_partials_keeps_finished_folders(tmp_path):
    finished = tmp_path / "merges" / "abc"
    with atomic_folder(finished) as folder:
        (folder / "x").write_text("done")
    stale = tmp_path / "merges" / ".def.partial-1234"
    stale.mkdir()
    (tmp_path / "calibrated" / ".ghi.partial-99").mkdir(parents=True)

    removed = versioning.clean_stale_partials(tmp_path)
    assert len(removed) == 2
    assert finished.is_dir() and not stale.exists()
    assert not list((tmp_path / "calibrated").iterdir())
