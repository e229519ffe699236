import json

import pytest

from medq import artifacts, runrecord


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "model.pb"
    artifacts.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pb"]


def test_atomic_files_get_the_mode_open_would_give(tmp_path):
    import os
    import stat

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    written = artifacts.write_bytes(tmp_path / "report.json", b"{}")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_manifest_records_artifacts_with_sha256_and_merges_stages(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    runrecord.commit(tmp_path, "train", artifacts={"a": tmp_path / "a.bin"}, best_epoch=3,
                     facts={"classes": ["x", "y"]})
    runrecord.commit(tmp_path, "freeze", parity_max_abs_diff=0.0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["artifacts"]["a"] | {"created_at": ""} == {
        "path": "a.bin", "bytes": 3, "stage": "train", "created_at": "", "inputs": {}, "sources": {},
        "invalidated": None, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert manifest["stages"]["train"]["best_epoch"] == 3
    assert manifest["stages"]["freeze"]["parity_max_abs_diff"] == 0.0
    assert manifest["classes"] == ["x", "y"]
    assert "numpy" in manifest["versions"]
    assert runrecord.recorded_path(tmp_path, "a") == tmp_path / "a.bin"
    assert runrecord.recorded_path(tmp_path, "missing") is None
