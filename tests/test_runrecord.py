"""The run record (medq.runrecord): lineage and staleness, atomic commits, the writer lock, confined and verified
artifact paths, strict JSON, pinned splits. Each test names the failure it rules out; none trains a model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq import artifacts, runrecord
from medq.data import pinned
from medq.config import load_config
from medq.errors import MedqError


def _write(run: Path, name: str, data: bytes) -> Path:
    return artifacts.write_bytes(runrecord.staging_path(run, name), data)


def _chain(run: Path) -> None:
    """A run with model.keras → model_fp32.pb → model_int8.pb → benchmark.json, each committed by its stage."""
    runrecord.commit(run, "train", artifacts={"keras_model": _write(run, "model.keras", b"model v1")})
    runrecord.commit(run, "freeze", artifacts={"fp32_pb": _write(run, "model_fp32.pb", b"fp32 v1")},
                     inputs=("keras_model",))
    runrecord.commit(run, "quantize", artifacts={"int8_pb": _write(run, "model_int8.pb", b"int8 v1")},
                     inputs=("fp32_pb",))
    runrecord.commit(run, "benchmark", artifacts={"benchmark_json": _write(run, "benchmark.json", b"{}")},
                     inputs=("fp32_pb", "int8_pb"))


def test_a_retrain_makes_every_downstream_artifact_stale_and_unloadable(tmp_path):
    run = tmp_path / "run"
    _chain(run)
    assert runrecord.verified_path(run, "int8_pb") == run / "model_int8.pb"
    runrecord.commit(run, "train", artifacts={"keras_model": _write(run, "model.keras", b"model v2")})
    stale = runrecord.stale(run)
    assert set(stale) == {"fp32_pb", "int8_pb", "benchmark_json"}
    assert "older model.keras" in stale["fp32_pb"]
    with pytest.raises(MedqError, match=r"model_int8.pb: stale, its input model_fp32.pb is stale.*rerun `medq quantize"):
        runrecord.verified_path(run, "int8_pb")
    with pytest.raises(MedqError, match=r"model_fp32.pb: stale.*rerun `medq freeze"):
        runrecord.verified_path(run, "fp32_pb")
    runrecord.commit(run, "freeze", artifacts={"fp32_pb": _write(run, "model_fp32.pb", b"fp32 v2")},
                     inputs=("keras_model",))
    assert runrecord.verified_path(run, "fp32_pb") and "int8_pb" in runrecord.stale(run)  # INT8 still from v1


def test_a_failed_quantize_after_a_success_withdraws_the_old_int8_graph(tmp_path):
    run = tmp_path / "run"
    _chain(run)
    runrecord.commit(run, "quantize", invalidate={"int8_pb": "the last `medq quantize` failed"}, status="failed")
    with pytest.raises(MedqError, match="the last `medq quantize` failed"):
        runrecord.verified_path(run, "int8_pb")
    assert not runrecord.usable(run, "int8_pb")
    assert runrecord.read_manifest(run)["stages"]["quantize"] == {
        "status": "failed", "finished_at": runrecord.read_manifest(run)["stages"]["quantize"]["finished_at"]}


def test_a_file_changed_behind_the_manifest_is_not_loaded(tmp_path):
    run = tmp_path / "run"
    _chain(run)
    (run / "model_fp32.pb").write_bytes(b"edited by hand")
    with pytest.raises(MedqError, match="changed since `medq freeze` recorded it"):
        runrecord.verified_path(run, "fp32_pb")
    (run / "model_fp32.pb").unlink()
    with pytest.raises(MedqError, match="recorded in the run's manifest but missing"):
        runrecord.verified_path(run, "fp32_pb")


@pytest.mark.parametrize("path", ["../outside.pb", "/etc/passwd", "a/../../b"])
def test_manifest_paths_may_not_leave_the_run_folder(tmp_path, path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": 2, "artifacts": {
        "fp32_pb": {"path": path, "sha256": "0" * 64, "bytes": 1}}}))
    with pytest.raises(MedqError, match="points outside the run folder"):
        runrecord.verified_path(run, "fp32_pb")


def test_a_corrupt_manifest_is_one_line_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"stages": {"train": ')
    with pytest.raises(MedqError) as caught:
        runrecord.read_manifest(run)
    assert str(caught.value).startswith(f"{run / 'manifest.json'}: unreadable") and "\n" not in str(caught.value)


def test_nan_is_written_as_null_so_strict_json_readers_accept_the_manifest(tmp_path):
    run = tmp_path / "run"
    runrecord.commit(run, "train", val_metrics={"auc": float("nan"), "accuracy": np.float32(0.5),
                                                "per_class": np.array([np.inf, 1.0])})
    text = (run / "manifest.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in manifest.json"))
    assert strict["stages"]["train"]["val_metrics"] == {"auc": None, "accuracy": 0.5, "per_class": [None, 1.0]}
    report = artifacts.write_json(tmp_path / "report.json", {"x": float("-inf")})
    assert json.loads(report.read_text(), parse_constant=lambda name: pytest.fail(name)) == {"x": None}


def test_a_commit_killed_before_its_journal_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _chain(run)
    before = (run / "manifest.json").read_bytes()
    _write(run, "model.keras", b"half-trained model")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # SIGKILL while the journal is being written: the atomic write never lands

    monkeypatch.setattr(runrecord.journal.files, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        runrecord.commit(run, "train", artifacts={"keras_model": run / ".staging" / "model.keras"})
    monkeypatch.undo()
    assert (run / "manifest.json").read_bytes() == before
    assert (run / "model.keras").read_bytes() == b"model v1"
    assert runrecord.verified_path(run, "int8_pb") and not (run / ".staging").exists()


def test_a_commit_killed_after_its_journal_is_finished_by_the_next_command(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _chain(run)
    original = os.replace

    def killed_before_the_manifest_lands(src, dst):
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt
        original(src, dst)

    staged = _write(run, "model.keras", b"model v2")
    monkeypatch.setattr(runrecord.journal.os, "replace", killed_before_the_manifest_lands)
    with pytest.raises(KeyboardInterrupt):  # model.keras renamed, manifest not yet written
        runrecord.commit(run, "train", artifacts={"keras_model": staged})
    monkeypatch.undo()
    assert (run / runrecord.JOURNAL).is_file()
    manifest = runrecord.load(run)  # a reader rolls the commit forward: file and record agree again
    assert not (run / runrecord.JOURNAL).exists()
    assert manifest.artifacts["keras_model"].sha256 == artifacts.sha256(run / "model.keras")
    assert (run / "model.keras").read_bytes() == b"model v2" and "fp32_pb" in runrecord.stale(run)


HOLD = textwrap.dedent("""
    import sys, time
    from medq import runrecord
    with runrecord.writer_lock(sys.argv[1], "train"):
        print("held", flush=True)
        time.sleep(30)
""")


def test_a_second_writer_stops_at_once_naming_the_holder_and_readers_do_not_wait(tmp_path):
    run = tmp_path / "run"
    _chain(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runrecord.RunLocked, match=rf"in use by pid {holder.pid} \(medq train"):
            runrecord.commit(run, "freeze", parity_max_abs_diff=0.0)
        assert runrecord.verified_path(run, "int8_pb")  # a reader (predict, runs show) goes on
    finally:
        holder.kill()
        holder.wait()
    runrecord.commit(run, "freeze", parity_max_abs_diff=0.0)  # the lock died with its process


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    run = tmp_path / "run"
    with runrecord.writer_lock(run, "run"):
        runrecord.commit(run, "data", n=1)  # a stage inside `medq run` commits under the pipeline's lock
        assert runrecord.holds_lock(run)
    assert not runrecord.holds_lock(run)


# --- pinned splits ----------------------------------------------------------------------------------------------

def _folder_dataset(root: Path, per_class: int = 12, classes=("NORMAL", "PNEUMONIA")) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                cv2.imwrite(str(folder / f"p{i}_{c}_{split}.png"), rng.integers(0, 255, (16, 16), dtype=np.uint8))


def _config(tmp_path, root, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}", "data.format=folder",
                              *overrides])


def test_the_split_is_pinned_and_files_added_later_never_reach_any_split(tmp_path):
    root = tmp_path / "data"
    _folder_dataset(root)
    config = _config(tmp_path, root)
    first = pinned.run_index(config, stage="train")
    assert (config.run_dir / "split.json").is_file()
    # a new download batch: with the same seed a fresh split would now move patients between splits
    _folder_dataset(root, per_class=30)
    later = pinned.run_index(config, stage="benchmark")
    for split in ("train", "val", "test"):
        assert later.paths(split) == first.paths(split)
    assert any("added to the dataset since the split was pinned are not used" in n for n in later.notes)
    gone = first.paths("test")[0]
    os.remove(gone)
    after = pinned.run_index(config, stage="benchmark")
    assert gone not in after.paths("test") and len(after.paths("test")) == len(first.paths("test")) - 1
    assert any(p == gone for p, _ in after.skipped)
    again = pinned.run_index(config, resplit=True)  # the explicit way: medq data --resplit
    assert len(again.paths("train")) + len(again.paths("val")) > len(first.paths("train")) + len(first.paths("val"))


def test_a_resplit_makes_the_models_stale(tmp_path):
    root = tmp_path / "data"
    _folder_dataset(root)
    config = _config(tmp_path, root)
    pinned.run_index(config, stage="train")
    run = config.run_dir
    runrecord.commit(run, "train", artifacts={"keras_model": _write(run, "model.keras", b"m")}, inputs=("split",))
    _folder_dataset(root, per_class=20)
    pinned.run_index(config, resplit=True)
    with pytest.raises(MedqError, match="stale, it was made from an older split.json"):
        runrecord.verified_path(run, "keras_model")


def test_changed_split_settings_or_classes_are_an_error_that_names_resplit(tmp_path):
    root = tmp_path / "data"
    _folder_dataset(root)
    pinned.run_index(_config(tmp_path, root), stage="train")
    with pytest.raises(MedqError, match=r"val_fraction 0.2 → 0.3.*medq data --resplit"):
        pinned.run_index(_config(tmp_path, root, "data.val_fraction=0.3"), stage="quantize")
    for split in ("train", "test"):
        os.rename(root / split / "PNEUMONIA", root / split / "VIRAL")
    with pytest.raises(MedqError, match=r"classes are now .*VIRAL.*split with .*PNEUMONIA"):
        pinned.run_index(_config(tmp_path, root), stage="benchmark")


def test_check_classes_refuses_another_class_order(tmp_path):
    from medq.data.index import DatasetIndex

    index = DatasetIndex("folder", "binary", ["PNEUMONIA", "NORMAL"], {"train": [], "val": [], "test": []})
    with pytest.raises(MedqError, match=r"predicts \['NORMAL', 'PNEUMONIA'\] \(in this order\)"):
        runrecord.check_classes(tmp_path, {"classes": ["NORMAL", "PNEUMONIA"], "task": "binary"}, index)


def test_legacy_keras_formats_need_an_explicit_trust_flag(tmp_path):
    from medq.models import load_keras_model

    legacy = tmp_path / "model.h5"
    legacy.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(MedqError, match="--trust-model-file"):
        load_keras_model(legacy)
    (tmp_path / "saved").mkdir()
    with pytest.raises(MedqError, match="--trust-model-file"):
        load_keras_model(tmp_path / "saved")
