"""Step fingerprints and the clean-up of half-written folders."""

from __future__ import annotations

import shutil

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


def test_calibrate_fingerprint_covers_the_finetune_training_split(
    tiny_family, dvc_project, tmp_path
):
    data = shutil.copytree(dvc_project / "data" / "demo", tmp_path / "data")
    router = {"method": "finetune", "finetune": {"split": "train", "steps": 2}}
    path = write_pipeline_config(tmp_path, tiny_family, dvc_project, router=router)
    finetune = load_config(path)
    finetune = finetune.model_copy(update={"data": finetune.data.model_copy(update={"root": data})})
    centroid = finetune.model_copy(
        update={"router": finetune.router.model_copy(update={"method": "centroid"})}
    )
    merged = {"key": "merged"}
    before = {
        "finetune": versioning.calibrate_fingerprint(finetune, merged),
        "centroid": versioning.calibrate_fingerprint(centroid, merged),
    }

    train = data / "code" / "train.jsonl"
    assert train.is_file()
    train.write_text("\n".join(train.read_text().splitlines()[::-1]) + "\n")
    # finetune trains on that split: a new key; centroid never reads it: the same key
    assert versioning.calibrate_fingerprint(finetune, merged) != before["finetune"]
    assert versioning.calibrate_fingerprint(centroid, merged) == before["centroid"]


def test_calibrate_fingerprint_covers_the_negative_text_file(tiny_family, dvc_project, tmp_path):
    negative = tmp_path / "negative.txt"
    negative.write_text("nothing about any domain\n")
    router = {
        "method": "centroid",
        "centroid": {"negative": "texts", "negative_texts": {"path": str(negative)}},
    }
    config = load_config(write_pipeline_config(tmp_path, tiny_family, dvc_project, router=router))
    merged = {"key": "merged"}
    before = versioning.calibrate_fingerprint(config, merged)

    # the same path with other content must not reuse the calibrated routers
    negative.write_text("something else entirely\n")
    assert versioning.calibrate_fingerprint(config, merged) != before


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
