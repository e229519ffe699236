"""One image in two splits, conflicting labels, classes missing from a split, symlink loops, TIFF/BMP (issue 20,
items 1 and 6). Fixtures are made the way real files are: images encoded by OpenCV, copies by shutil.copy,
aliases and links by os.symlink, label tables written as text."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.config import DataConfig
from medq.data.check import check_dataset, format_check_report
from medq.data.decode import UnreadableImage, check_header, load_pixels
from medq.data.readers import read_dataset
from medq.errors import DataError


def image(path: Path) -> Path:
    """A 32×32 grayscale image encoded by the path's suffix (PNG, JPEG, TIFF, BMP), its pixels drawn from the path
    (two paths: two different images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(zlib.crc32(str(path).encode())).integers(0, 256, (32, 32)).astype(np.uint8)
    ok, data = cv2.imencode(path.suffix, pixels)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def table(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def read(root: Path, fmt: str = "auto", seed: int = 42, **kw):
    return read_dataset(DataConfig(format=fmt, root=str(root), **kw), seed=seed)


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def csv_dataset(root: Path, n: int = 8) -> list[str]:
    """imgs/0..n-1.jpeg, two classes alternating, the last two in test: the table rows (header first)."""
    rows = ["path,label,split"]
    for i in range(n):
        image(root / "imgs" / f"{i}.jpeg")
        rows.append(f"imgs/{i}.jpeg,{'AB'[i % 2]},{'test' if i >= n - 2 else 'train'}")
    return rows


# --- item 1: one image in two splits ---------------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["./imgs/../imgs/0.jpeg", "linked/0.jpeg"])
def test_csv_path_alias_in_two_splits_is_an_error_naming_both_lines(tmp_path, alias):
    root = tmp_path / "ds"
    rows = csv_dataset(root)
    (root / "linked").symlink_to(root / "imgs", target_is_directory=True)
    rows.append(f"{alias},A,test")  # line 10: the train image of line 2, again for test
    table(root / "labels.csv", rows)
    with pytest.raises(DataError) as err:
        read(root, "csv")
    text = str(err.value)
    assert "labels.csv line 2 (imgs/0.jpeg) (train)" in text and f"labels.csv line 10 ({alias}) (test)" in text
    assert "cross_split_copies: drop-later" in text

    kept = read(root, "csv", cross_split_copies="drop-later")
    real = os.path.realpath(root / "imgs" / "0.jpeg")
    assert real in kept.paths("train") + kept.paths("val") and real not in kept.paths("test")
    assert len(kept.splits["test"]) == 2  # lines 8 and 9 only
    assert [(p, r.split(":")[0]) for p, r in kept.skipped if "dropped from test" in r] == [
        (real, f"labels.csv line 10 ({alias})")]


def test_csv_same_file_two_labels_is_an_error_with_both_lines(tmp_path):
    root = tmp_path / "ds"
    rows = csv_dataset(root)
    rows.append("./imgs/../imgs/2.jpeg,B,train")  # line 4 says A
    table(root / "labels.csv", rows)
    with pytest.raises(DataError, match=r"2\.jpeg: listed twice with two labels, A and B: labels\.csv line 4 "
                                        r".*labels\.csv line 10"):
        read(root, "csv", cross_split_copies="drop-later")  # the policy is for leaks, not for conflicts


def test_csv_same_file_twice_same_label_is_used_once(tmp_path):
    root = tmp_path / "ds"
    rows = csv_dataset(root)
    rows.append("imgs/./3.jpeg,B,train")
    table(root / "labels.csv", rows)
    index = read(root, "csv")
    paths = [p for split in index.splits.values() for p in (s.path for s in split)]
    assert sorted(paths) == sorted(os.path.realpath(root / "imgs" / f"{i}.jpeg") for i in range(8))
    assert any("listed twice with the same label" in note and "line 5" in note and "line 10" in note
               for note in index.notes)


def test_byte_identical_copies_across_the_datasets_splits(tmp_path):
    """Folder layout (Kaggle-like split folders) and CSV layout: a copy in test of a train image is refused."""
    folder = tmp_path / "folder"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for i in range(3):
                image(folder / split / cls / f"{split}{i}.png")
    shutil.copy(folder / "train" / "NORMAL" / "train1.png", folder / "test" / "NORMAL" / "renamed.png")
    with pytest.raises(DataError, match=r"byte-identical copies in two splits: \S+train/NORMAL/train1\.png \(train\) "
                                        r"and \S+test/NORMAL/renamed\.png \(test\)"):
        read(folder, "folder")
    report = check_dataset(folder, format="folder")
    assert not report["ok"] and len(report["errors"]) == 1 and "renamed.png" in report["errors"][0]
    assert "NOT usable" in format_check_report(report)

    root = tmp_path / "csv"
    rows = csv_dataset(root)
    shutil.copy(root / "imgs" / "1.jpeg", root / "imgs" / "copy.jpeg")
    rows.append("imgs/copy.jpeg,B,test")
    table(root / "labels.csv", rows)
    with pytest.raises(DataError, match=r"labels\.csv line 3 \(imgs/1\.jpeg\) \(train\) and labels\.csv line 10 "
                                        r"\(imgs/copy\.jpeg\) \(test\)"):
        read(root, "csv")


def test_kaggle_test_folder_linked_to_train_files_and_nih_name_in_both_lists(tmp_path):
    """The dataset's own splits: a Kaggle test/ file that is a symbolic link to a train/ file, and an NIH image
    named in both train_val_list.txt and test_list.txt (it used to go to test silently)."""
    kaggle = tmp_path / "chest_xray"
    for split in ("train", "test"):
        for cls, name in (("NORMAL", "IM-{:04d}-0001.jpeg"), ("PNEUMONIA", "person{}_bacteria_1.jpeg")):
            for i in range(3):
                image(kaggle / split / cls / name.format(i + (10 if split == "test" else 0)))
    (kaggle / "test" / "NORMAL" / "IM-0099-0001.jpeg").symlink_to(kaggle / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    with pytest.raises(DataError, match=r"train/NORMAL/IM-0001-0001\.jpeg: listed twice in two splits: .* \(train\) "
                                        r"and \S+test/NORMAL/IM-0099-0001\.jpeg \(test\)"):
        read(kaggle, "kaggle-pneumonia")

    nih = tmp_path / "nih"
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for i in range(8):
        image(nih / "images_001" / "images" / f"{i:08d}_000.png")
        rows.append(f"{i:08d}_000.png,{'Effusion' if i % 2 else 'No Finding'},0,{i}")
    table(nih / "Data_Entry_2017.csv", rows)
    table(nih / "train_val_list.txt", [f"{i:08d}_000.png" for i in range(6)])
    table(nih / "test_list.txt", ["00000006_000.png", "00000007_000.png", "00000002_000.png"])
    with pytest.raises(DataError, match=r"train_val_list\.txt line 3 \(00000002_000\.png\) \(train\) and "
                                        r"test_list\.txt line 3 \(00000002_000\.png\) \(test\)"):
        read(nih, "nih-chestxray14")
    kept = read(nih, "nih-chestxray14", cross_split_copies="drop-later")
    assert sorted(Path(p).name for p in kept.paths("test")) == ["00000006_000.png", "00000007_000.png"]


def test_copies_with_two_labels_are_an_error(tmp_path):
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        for i in range(4):
            image(root / cls / f"{cls}{i}.png")
    shutil.copy(root / "a" / "a0.png", root / "b" / "also.png")
    with pytest.raises(DataError, match=r"byte-identical copies with two labels, a and b"):
        read(root, "folder")


def test_a_split_medq_carves_keeps_copies_and_aliases_together(tmp_path):
    """No split column: medq carves val and test. Copies (hashed independently here) and aliases of one file must
    land in one split, for every seed tried."""
    root = tmp_path / "ds"
    rows = ["path,label"]
    for i in range(30):
        image(root / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{'AB'[i % 2]}")
    for i in range(0, 30, 3):  # ten copies under other names, and ten aliases of the same files
        shutil.copy(root / "imgs" / f"{i}.png", root / "imgs" / f"copy{i}.png")
        rows += [f"imgs/copy{i}.png,{'AB'[i % 2]}", f"imgs/../imgs/{i + 1}.png,{'AB'[(i + 1) % 2]}"]
    table(root / "labels.csv", rows)
    for seed in range(6):
        index = read(root, "csv", seed=seed, val_fraction=0.3, test_fraction=0.3)
        where: dict[str, set[str]] = {}
        for split, samples in index.splits.items():
            for s in samples:
                where.setdefault(sha(s.path), set()).add(split)
        assert all(len(splits) == 1 for splits in where.values()), seed
        assert sum(len(v) for v in index.splits.values()) == 40  # 30 images + 10 copies; aliases once
        assert len(where) == 30


def test_identical_files_against_hashlib(tmp_path):
    """Same size and same start, middle and end but one other byte in between: not copies (only a full hash tells);
    a true copy of a long file, and of a short one: found."""
    from medq.data.duplicates import identical_files

    long = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    files = {"a": long, "b": long, "c": long[:25_000] + bytes([long[25_000] ^ 1]) + long[25_001:],
             "d": b"short", "e": b"short", "f": b"other"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    expected: dict[str, list[str]] = {}
    for p in paths:
        expected.setdefault(sha(p), []).append(p)
    assert sorted(identical_files(paths)) == sorted(g for g in expected.values() if len(g) > 1)


# --- classes missing from a split ------------------------------------------------------------------------------

def test_a_class_only_in_test_is_an_error_and_a_class_missing_from_test_a_warning(tmp_path):
    root = tmp_path / "ds"
    rows = ["path,label,split"]
    for i in range(12):
        image(root / f"{i}.png")
        rows.append(f"{i}.png,{'AB'[i % 2]},train")
    image(root / "c.png")
    rows.append("c.png,C,test")  # C: only in test
    table(root / "labels.csv", rows)
    with pytest.raises(DataError, match=r"class C has no training image \(test: C 1\)"):
        read(root, "csv")
    report = check_dataset(root, format="csv")
    assert any("class C has no training image" in e for e in report["errors"]) and not report["ok"]
    text = format_check_report(report)
    assert "errors: 1" in text and "NOT usable" in text
    # C in train as well, B then missing from test: a warning, with the split and the class
    for i in range(2, 6):
        image(root / f"c{i}.png")
    table(root / "labels.csv", rows + [f"c{i}.png,C,train" for i in range(2, 6)])
    report = check_dataset(root, format="csv", val_fraction=0.25)
    assert report["errors"] == []
    assert any(w.startswith("test has no image of class A, B") for w in report["warnings"])


# --- item 6: folders -------------------------------------------------------------------------------------------

def test_a_symlink_loop_is_followed_once(tmp_path):
    root = tmp_path / "ds"
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(4):
            image(root / cls / f"{cls}{i}.png")
        (root / cls / "sub").mkdir()
        image(root / cls / "sub" / "deep.png")
    (root / "NORMAL" / "sub" / "loop").symlink_to(root / "NORMAL", target_is_directory=True)
    (root / "PNEUMONIA" / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    image(tmp_path / "elsewhere" / "linked.png")  # a symlinked folder outside the dataset is read, once
    index = read(root, "folder", val_fraction=0.25, test_fraction=0.25)
    paths = sorted(p for split in index.splits for p in index.paths(split))
    expected = sorted(os.path.realpath(p) for p in root.rglob("*.png")) + [str(tmp_path / "elsewhere" / "linked.png")]
    assert paths == sorted(expected) and len(paths) == 11
    assert any("not followed again" in note and "loop" in note for note in index.notes)
    (root / "NORMAL" / "gone.png").symlink_to(tmp_path / "deleted.png")  # a broken link: a listed skip
    index = read(root, "folder", val_fraction=0.25, test_fraction=0.25)
    assert [(Path(p).name, r) for p, r in index.skipped] == [("gone.png", "broken symbolic link (its target does "
                                                                         "not exist)")]


def test_tiff_and_bmp_get_one_rule_in_check_and_predict(tmp_path):
    """TIFF and BMP are image formats medq does not decode: `data check` and `medq predict` both report them as
    unreadable with the decoder's reason, neither passes over them."""
    from medq.predict import collect_inputs

    root = tmp_path / "ds"
    for cls in ("a", "b"):
        for i in range(4):
            image(root / cls / f"{cls}{i}.png")
    tiff = image(root / "a" / "scan.tiff")
    bmp = image(root / "b" / "scan.bmp")
    (root / "b" / "notes.txt").write_text("not an image")
    reason = check_header(tiff)
    assert "image format medq does not read" in reason and check_header(bmp) == reason.replace(".tiff", ".bmp")
    report = check_dataset(root, format="folder")
    unreadable = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    assert "image format medq does not read" in unreadable["scan.tiff"]
    assert "image format medq does not read" in unreadable["scan.bmp"]
    with pytest.raises(UnreadableImage) as err:
        load_pixels(tiff)  # what predict reports for it: the same reason as data check's
    assert str(err.value) == f"{tiff}: {unreadable['scan.tiff']}"
    items, ignored = collect_inputs([root])
    assert {i.path.name for i in items} >= {"scan.tiff", "scan.bmp"} and ignored == 1  # only notes.txt
    assert json.dumps(report)  # the report stays JSON


# --- the run: its pinned split and its record -------------------------------------------------------------------

def _run_config(tmp_path, root, *overrides):
    from medq.config import load_config

    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}", "data.generate=false",
                              *overrides])


def test_a_pin_written_with_unresolved_paths_still_matches_the_dataset(tmp_path):
    """Pins made before paths were resolved name files through the symlinked data root: they are the same files."""
    from medq.data.pinned import _apply_pin, split_settings

    real = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(6):
            image(real / cls / f"{cls}{i}.png")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    config = _run_config(tmp_path, tmp_path / "link", "data.format=folder")
    current = read(tmp_path / "link", "folder")
    assert all(p.startswith(str(real)) for split in current.splits for p in current.paths(split))
    old_pin = {"settings": split_settings(config), "format": current.format, "task": current.task,
               "classes": current.classes,
               "samples": [[s.path.replace(str(real), str(tmp_path / "link")), split, s.patient, list(s.label), 0, 0]
                           for split, samples in current.splits.items() for s in samples]}
    pinned = _apply_pin(config, old_pin, current, tmp_path / "split.json")
    assert {k: sorted(pinned.paths(k)) for k in pinned.splits} == {k: sorted(current.paths(k)) for k in current.splits}
    assert not pinned.skipped and not any("added" in n or "gone" in n for n in pinned.notes)


def test_medq_data_records_a_class_missing_from_test(tmp_path):
    from medq import runrecord
    from medq.pipeline import run_data

    root = tmp_path / "ds"
    rows = ["path,label,split"]
    for i in range(10):
        image(root / f"{i}.png")
        rows.append(f"{i}.png,{'AB'[i % 2]},{'test' if i == 9 else 'train'}")  # test: one B, no A
    table(root / "labels.csv", rows)
    config = _run_config(tmp_path, root / "labels.csv", "data.format=csv")
    run_data(config)
    stages = runrecord.read_manifest(config.run_dir)["stages"]
    for stage in ("data", "split"):  # the split's record too: a run pinned by `medq train` alone has it
        assert "test has no image of class A: its test sensitivity and AUC are undefined" in stages[stage]["warnings"]


def test_label_conflicts_drop_both_leaves_out_every_listing_and_copy(tmp_path):
    root = tmp_path / "ds"
    rows = csv_dataset(root)
    shutil.copy(root / "imgs" / "2.jpeg", root / "imgs" / "copy2.jpeg")
    rows += ["imgs/../imgs/2.jpeg,B,train", "imgs/copy2.jpeg,A,train"]  # 2.jpeg: A (line 4) and B; a copy says A
    table(root / "labels.csv", rows)
    index = read(root, "csv", label_conflicts="drop-both")
    used = {Path(p).name for split in index.splits for p in index.paths(split)}
    assert used == {f"{i}.jpeg" for i in range(8)} - {"2.jpeg"}
    assert sorted(Path(p).name for p, r in index.skipped if "two labels" in r) == ["2.jpeg", "2.jpeg", "copy2.jpeg"]
