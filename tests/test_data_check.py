"""`medq data check`: the report on a dataset folder, and full-decode verification of an index."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.config import DataConfig
from medq.data.check import check_dataset, format_check_report, verify_images
from medq.data.decode import UnreadableImage, check_header
from medq.data.nih import CSV_COLUMNS
from medq.data.readers import read_dataset


def png(path: Path, shape=(20, 30), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(np.prod(shape)).reshape(shape) % 200).astype(dtype)
    # a few pixels drawn from the path: two files are two images (identical bytes would be copies)
    pixels.flat[:8] = np.random.default_rng(zlib.crc32(str(path).encode())).integers(0, 200, 8)
    path.write_bytes(cv2.imencode(path.suffix, pixels)[1].tobytes())
    return path


def corrupt_body(path: Path) -> Path:
    """A PNG whose header and IEND are intact but whose image data is garbage: only a full decode finds it."""
    data = bytearray(png(path, (40, 40)).read_bytes())
    start = data.index(b"IDAT") + 4
    data[start:start + 40] = bytes(range(40))
    path.write_bytes(bytes(data))
    return path


def folder_dataset(root: Path) -> Path:
    for cls in ("effusion", "normal"):
        for i in range(10):
            png(root / cls / f"{cls}{i}.png", (20 + i, 30) if i % 2 else (24, 24, 3))
    png(root / "normal" / "deep16.png", (32, 32), np.uint16)
    (root / "normal" / "empty.png").write_bytes(b"")
    corrupt_body(root / "effusion" / "broken.png")
    return root


def test_verify_images_moves_undecodable_files_to_skipped(tmp_path):
    root = folder_dataset(tmp_path / "ds")
    assert check_header(root / "effusion" / "broken.png") is None  # the cheap check cannot see it
    index = read_dataset(DataConfig(format="folder", root=str(root)), seed=1)
    assert sum(len(v) for v in index.splits.values()) == 22
    verified = verify_images(index)
    assert sum(len(v) for v in verified.splits.values()) == 21
    assert [Path(p).name for p, _ in verified.skipped] == ["empty.png", "broken.png"]
    assert "corrupt" in verified.skipped[-1][1] and verified.notes[-1].startswith("verified 22 images")
    assert sum(len(v) for v in index.splits.values()) == 22  # the input index is left as it was
    with pytest.raises(UnreadableImage, match="broken.png: .*data.strict"):
        verify_images(index, strict=True)


def test_check_report_counts_sizes_unreadable_and_overlap(tmp_path):
    root = folder_dataset(tmp_path / "ds")
    report = check_dataset(root, seed=3, val_fraction=0.25, test_fraction=0.2)
    assert report["format"] == "folder" and report["detected"] and report["task"] == "binary"
    assert report["images"] == 22 and report["verified"] == "all"
    assert sum(s["per_class"]["normal"] for s in report["splits"].values()) == 11
    assert sum(s["images"] for s in report["splits"].values()) == 22
    stats = report["image_stats"]["train"]
    assert stats["decoded"] == stats["of"] and not stats["sample"]
    channels = [report["image_stats"][s]["channels"] for s in report["splits"]]
    merged = {k: sum(c.get(k, 0) for c in channels) for k in ("gray", "RGB")}
    assert merged == {"gray": 11, "RGB": 10}  # the broken file does not decode
    assert stats["width"]["min"] >= 24 and stats["height"]["max"] <= 32
    assert {Path(u["path"]).name for u in report["unreadable"]} == {"empty.png", "broken.png"}
    assert report["patient_overlap"] == {"test/train": 0, "test/val": 0, "train/val": 0}
    assert not report["ok"]
    json.dumps(report)  # the CLI's --json prints it as is
    text = format_check_report(report)
    for expected in ("format: folder (detected)", "effusion", "normal", "every image decoded", "broken.png",
                     "patients in two splits", "(none)", "16-bit 1"):
        assert expected in text, expected


def test_check_samples_large_splits_and_reports_multilabel_counts(tmp_path):
    root = tmp_path / "nih"
    rows = [",".join(CSV_COLUMNS) + ","]
    for i in range(60):
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"
        png(root / "images_001" / "images" / name, (16, 16))
        labels = ["No Finding", "Mass", "Effusion|Mass"][i % 3]
        rows.append(f"{name},{labels},{i % 2},{i // 2 + 1},40,F,PA,2500,2500,0.143,0.143,")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    report = check_dataset(root, format="nih-chestxray14", seed=1, val_fraction=0.2, test_fraction=0.2)
    assert not report["detected"] and report["task"] == "multilabel"
    assert sum(s["per_class"]["Mass"] for s in report["splits"].values()) == 40
    assert sum(s["no_label"] for s in report["splits"].values()) == 20
    sampled = check_dataset(root, seed=1, verify_all_up_to=10, sample_per_split=5)
    assert sampled["verified"] == "sample" and sampled["image_stats"]["train"]["decoded"] == 5
    assert "random sample" in format_check_report(sampled) and sampled["ok"]


def test_cli_check_splits_as_the_config_does(tmp_path, capsys):
    """`medq data check PATH --config X --json`: the same splits the run of X makes (its fractions and seed)."""
    from medq.cli import main

    root = tmp_path / "ds"
    for cls in ("effusion", "normal"):
        for i in range(20):
            png(root / cls / f"{cls}{i}.png", (16, 16))
    config = tmp_path / "small-val.yaml"
    config.write_text("data:\n  format: folder\n  val_fraction: 0.5\n  test_fraction: 0.25\nrun:\n  seed: 9\n")
    assert main(["data", "check", str(root), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["data", "check", str(root), "--config", str(config), "--json"]) == 0
    configured = json.loads(capsys.readouterr().out)
    # by hand: test takes 0.25 of the 40 patients (one image each), validation 0.5 of the 30 left
    expected = {"train": 15, "val": 15, "test": 10}
    assert {k: s["images"] for k, s in configured["splits"].items()} == expected
    assert configured["splits"]["test"]["per_class"] == {"effusion": 5, "normal": 5}  # stratified by class
    assert expected != {k: s["images"] for k, s in default["splits"].items()}
    assert configured["format"] == "folder" and default["format"] == "folder"
