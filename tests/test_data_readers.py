"""Every dataset layout users bring, built as a small fixture tree with the real archives' quirks, read exactly."""
from __future__ import annotations

import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.config import DataConfig
from medq.data.decode import UnreadableImage
from medq.data.dicom import dicom_bytes
from medq.data.index import Sample
from medq.data.nih import CHEXNET_CLASSES, CSV_COLUMNS
from medq.data.readers import DETECTORS, READERS, detect_format, patient_split, read_dataset
from medq.data.rsna import RSNA_CLASSES
from medq.errors import DataError

GRAY = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def image(path: Path, kind: str = "gray") -> Path:
    """A small valid image of the given kind, encoded by the path's suffix; its first row is drawn from the path, so
    two files are two different images (as in a real dataset: identical bytes are copies, which medq refuses across
    splits)."""
    gray = GRAY.copy()
    gray[0] = np.random.default_rng(zlib.crc32(str(path).encode())).integers(0, 256, 16)
    pixels = {"gray": gray, "rgb": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
              "rgba": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA), "16bit": gray.astype(np.uint16) * 257}[kind]
    ok, data = cv2.imencode(".png" if path.suffix == ".png" else ".jpg", pixels)
    assert ok
    return write(path, data.tobytes())


def truncated(path: Path) -> Path:
    noise = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)
    data = cv2.imencode(".png" if path.suffix == ".png" else ".jpg", noise)[1].tobytes()
    return write(path, data[: len(data) // 2])


def bad_files(folder: Path, suffix: str) -> dict[str, str]:
    """Corrupt, zero-byte, truncated and mis-named files: name → the reason they must be skipped with."""
    write(folder / f"empty{suffix}", b"")
    write(folder / f"page{suffix}", b"<html><body>404</body></html>")
    truncated(folder / f"cut{suffix}")
    return {"empty": "empty file", "page": "not a PNG, JPEG or DICOM", "cut": "truncated"}


def junk(folder: Path) -> None:
    write(folder / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(folder / "._resource.jpeg", b"\x00\x05\x16\x07")


def read(root: Path, fmt: str = "auto", **kw) -> object:
    seed = kw.pop("seed", 42)
    return read_dataset(DataConfig(format=fmt, root=str(root), **kw), seed=seed)


def skipped_names(index) -> dict[str, str]:
    return {Path(p).stem: reason for p, reason in index.skipped}


def assert_patient_wise(index) -> None:
    assert all(n == 0 for n in index.patient_overlap().values()), index.patient_overlap()


# --- Kaggle pneumonia ------------------------------------------------------------------------------------------

def kaggle_tree(base: Path) -> Path:
    """The archive as it unpacks: base/chest_xray/{train,test,val}, its nested duplicate and __MACOSX debris."""
    root = base / "chest_xray"
    for split, people in (("train", range(1, 11)), ("test", range(100, 104)), ("val", range(200, 202))):
        for p in people:
            image(root / split / "NORMAL" / f"IM-{p:04d}-0001.jpeg")
            image(root / split / "NORMAL" / f"NORMAL2-IM-{p:04d}-0001.jpeg", "rgb")  # some 3-channel JPEGs
            image(root / split / "PNEUMONIA" / f"person{p}_bacteria_{p * 3}.jpeg")
            image(root / split / "PNEUMONIA" / f"person{p}_bacteria_{p * 3 + 1}.jpeg")
            image(root / split / "PNEUMONIA" / f"person{p}_virus_{p * 3 + 2}.jpeg")
    image(root / "chest_xray" / "train" / "NORMAL" / "IM-9999-0001.jpeg")  # nested duplicate: ignored
    image(root / "chest_xray" / "train" / "PNEUMONIA" / "person9999_virus_1.jpeg")
    write(base / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0001-0001.jpeg", b"\x00\x05\x16\x07")
    junk(root / "train" / "NORMAL")
    write(root / ".DS_Store", b"\x00")
    bad_files(root / "train" / "PNEUMONIA", ".jpeg")
    return root


def test_kaggle_layout_exact_counts_quirks_and_patient_wise_validation(tmp_path):
    root = kaggle_tree(tmp_path)
    for where in (tmp_path, root):  # the archive's outer folder or chest_xray itself
        index = read(where)
        assert index.format == "kaggle-pneumonia" and index.task == "binary"
        assert index.notes[0].startswith("detected format: kaggle-pneumonia")
        assert index.classes == ["NORMAL", "PNEUMONIA"]
        train_val = {k: index.counts("train")[k] + index.counts("val")[k] for k in index.classes}
        assert train_val == {"NORMAL": 20, "PNEUMONIA": 30}  # nested duplicate, junk and bad files not counted
        assert index.counts("test") == {"NORMAL": 8, "PNEUMONIA": 12}
        assert len(index.splits["val"]) > 0 and all("/val/" not in s.path for s in index.splits["val"])
        assert not any("chest_xray/chest_xray" in s.path for v in index.splits.values() for s in v)
        assert skipped_names(index).keys() == {"empty", "page", "cut"}
        assert "truncated" in skipped_names(index)["cut"]
        assert_patient_wise(index)
        assert any("nested duplicate" in n for n in index.notes)
        assert any("unused" in n and "(10 images)" in n for n in index.notes)
        # one person's films stay together: person3's three films are all in train or all in val
        assert len({split for split, v in index.splits.items() for s in v if "/person3_" in s.path}) == 1


def test_kaggle_official_val_and_three_class_variant(tmp_path):
    root = kaggle_tree(tmp_path)
    official = read(root, val_split="official")
    assert len(official.splits["val"]) == 10 and len(official.splits["train"]) == 50
    three = read(root, variant="3-class")
    assert three.task == "multiclass" and three.classes == ["NORMAL", "BACTERIA", "VIRUS"]
    assert three.counts("test") == {"NORMAL": 8, "BACTERIA": 8, "VIRUS": 4}
    image(root / "train" / "PNEUMONIA" / "IM-0500-0001.jpeg")  # a pneumonia film whose name has no cause
    three = read(root, variant="3-class")
    assert "names no cause" in skipped_names(three)["IM-0500-0001"]
    with pytest.raises(DataError, match="no variant"):
        read(root, variant="5-class")


def test_strict_mode_raises_one_line_naming_the_file(tmp_path):
    root = kaggle_tree(tmp_path)
    with pytest.raises(UnreadableImage) as err:
        read(root, strict=True)
    text = str(err.value)
    assert "\n" not in text and str(root / "train" / "PNEUMONIA") in text and "data.strict" in text


def test_splits_are_deterministic_for_the_seed_and_stratified():
    samples = [Sample(f"{p}-{k}.png", (1.0, 0.0) if p % 4 else (0.0, 1.0), f"p{p}") for p in range(200) for k in
               range(1 + p % 3)]
    kept, taken = patient_split(samples, 0.25, 7)
    again = patient_split(samples, 0.25, 7)
    assert (kept, taken) == again and patient_split(samples, 0.25, 8)[1] != taken
    taken_patients = {s.patient for s in taken}
    assert len(taken_patients) == 50 and not taken_patients & {s.patient for s in kept}
    minority = {f"p{p}" for p in range(200) if p % 4 == 0}
    assert len(taken_patients & minority) in (12, 13)  # a quarter of the minority class, as of the whole


# --- NIH ChestX-ray14 ------------------------------------------------------------------------------------------

NIH_ROWS = [  # name, labels, patient
    ("00000001_000.png", "Cardiomegaly", 1), ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
    ("00000002_000.png", "No Finding", 2), ("00000003_000.png", "Hernia|Infiltration|Atelectasis", 3),
    ("00000004_000.png", "Effusion|Mass", 4), ("00000004_001.png", "No Finding", 4),
    ("00000005_000.png", "Nodule", 5), ("00000006_000.png", "Pleural_Thickening", 6),
    ("00000007_000.png", "Pneumothorax", 7), ("00000008_000.png", "Edema|Fibrosis", 8),
    ("00000009_000.png", "Pneumonia|Consolidation", 9), ("00000010_000.png", "No Finding", 10),
    ("00000011_000.png", "Covid", 11), ("00000012_000.png", "No Finding|Mass", 12),
    ("00000013_000.png", "No Finding", 13),  # its file is missing
]


def nih_tree(root: Path, lists: bool = True) -> Path:
    lines = [",".join(CSV_COLUMNS) + ","]  # the 2017 file's trailing empty column
    for i, (name, labels, patient) in enumerate(NIH_ROWS):
        lines.append(f"{name},{labels},{name[9:12].lstrip('0') or 0},{patient},{40 + i},M,PA,2500,2048,0.143,0.143,")
        if patient == 13:
            continue
        folder = "images_001" if patient <= 6 else "images_002"
        image(root / folder / "images" / name, ("rgba" if patient == 3 else "16bit" if patient == 5 else "gray"))
    lines.append(lines[2])  # a duplicated row (00000001_001.png)
    write(root / "Data_Entry_2017.csv", ("\n".join(lines) + "\n").encode())
    write(root / "images_002" / "images" / "._00000007_000.png", b"\x00\x05")
    if lists:
        train_val = [n for n, _, p in NIH_ROWS if p <= 9 or p >= 11]
        write(root / "train_val_list.txt", "\n".join(train_val).encode())
        write(root / "test_list.txt", "00000010_000.png\n".encode())
    return root


def vector(*names: str) -> tuple[float, ...]:
    return tuple(1.0 if c in names else 0.0 for c in CHEXNET_CLASSES)


def test_nih_labels_in_chexnet_order_official_lists_and_skips(tmp_path):
    index = read(nih_tree(tmp_path / "nih"))
    assert index.format == "nih-chestxray14" and index.task == "multilabel" and index.classes == CHEXNET_CLASSES
    labels = {Path(s.path).name: s.label for v in index.splits.values() for s in v}
    assert labels["00000001_001.png"] == vector("Cardiomegaly", "Emphysema")
    assert labels["00000002_000.png"] == vector()  # No Finding = all zero
    assert labels["00000003_000.png"] == vector("Hernia", "Infiltration", "Atelectasis")
    assert labels["00000009_000.png"] == vector("Pneumonia", "Consolidation")
    assert len(labels) == 12
    assert [Path(s.path).name for s in index.splits["test"]] == ["00000010_000.png"]
    reasons = skipped_names(index)
    assert "unknown finding 'Covid'" in reasons["00000011_000"]
    assert "together with findings" in reasons["00000012_000"]
    assert "no such file" in reasons["00000013_000"]
    assert "00000001_001" not in reasons  # its row twice with one label: used once, with a note naming both lines
    assert any("1 file(s) listed twice with the same label" in n and "00000001_001.png" in n for n in index.notes)
    assert any("missing image files: 1" in n for n in index.notes)
    assert any("official train_val_list.txt" in n for n in index.notes)
    patients = {s.patient for s in index.splits["val"]}
    assert patients and not patients & {s.patient for s in index.splits["train"]}
    assert_patient_wise(index)


def test_nih_without_lists_splits_patient_wise(tmp_path):
    index = read(nih_tree(tmp_path / "nih", lists=False), test_fraction=0.25, val_fraction=0.25)
    assert all(index.splits[s] for s in ("train", "val", "test"))
    assert sum(len(v) for v in index.splits.values()) == 12
    assert_patient_wise(index)


def test_nih_full_size_table_reads_in_seconds(tmp_path):
    """112,120 rows (30,805 patients) as in Data_Entry_2017.csv; only a few hundred files unpacked."""
    rng = np.random.default_rng(0)
    root = tmp_path / "nih"
    lines, names, patient, follow = [",".join(CSV_COLUMNS) + ","], [], 1, 0
    findings = CHEXNET_CLASSES + ["No Finding"] * 8
    for i in range(112_120):
        if i and (follow >= 3 or rng.random() < 0.27):
            patient, follow = patient + 1, 0
        name = f"{patient:08d}_{follow:03d}.png"
        picks = sorted({findings[k] for k in rng.integers(0, len(findings), 1 + int(rng.random() < 0.3))})
        label = "No Finding" if "No Finding" in picks else "|".join(picks)
        lines.append(f"{name},{label},{follow},{patient},58,M,PA,2682,2749,0.143,0.143,")
        names.append(name)
        follow += 1
    write(root / "Data_Entry_2017.csv", ("\n".join(lines) + "\n").encode())
    present = names[:: len(names) // 300][:300]
    for name in present:
        image(root / "images_001" / "images" / name)
    start = time.perf_counter()
    index = read(root)
    seconds = time.perf_counter() - start
    print(f"\nNIH reader: 112,120-row table, {len(present)} files present: {seconds:.2f} s")
    assert sum(len(v) for v in index.splits.values()) == len(present)
    assert any(f"missing image files: {112_120 - len(present)}" in n for n in index.notes)
    assert_patient_wise(index)


# --- RSNA pneumonia detection ----------------------------------------------------------------------------------

def rsna_tree(root: Path) -> Path:
    classes = {f"pid-{i:03d}": RSNA_CLASSES[i % 3] for i in range(30)}
    class_rows = []
    for pid, name in classes.items():
        class_rows += [f"{pid},{name}"] * (2 if name == "Lung Opacity" else 1)  # one row per box
        stored = (np.arange(64).reshape(8, 8) * 60).astype(np.uint16)
        write(root / "stage_2_train_images" / f"{pid}.dcm",
              dicom_bytes(stored, bits_stored=12, photometric="MONOCHROME1" if int(pid[-1]) % 2 else "MONOCHROME2",
                          rescale=(1.0, -1024.0), window=(1000.0, 3000.0), patient_id=pid))
    class_rows += ["pid-100,Normal", "pid-100,Lung Opacity", "pid-101,Pneumothorax", "pid-102,Normal"]
    write(root / "stage_2_train_images" / "pid-100.dcm", dicom_bytes(GRAY))
    write(root / "stage_2_train_images" / "pid-101.dcm", dicom_bytes(GRAY))
    write(root / "stage_2_train_images" / "pid-103.dcm", dicom_bytes(GRAY))  # no row: unused
    write(root / "stage_2_train_images" / "pid-029.dcm", b"")  # zero-byte (class 'No Lung Opacity / Not Normal')
    label_rows = [f"{pid},{'1,2,3,4,1' if n == 'Lung Opacity' else ',,,,0'}" for pid, n in classes.items()]
    label_rows[1] = "pid-001,,,,,1"  # Target 1 for a 'Normal' patient: contradiction
    write(root / "stage_2_detailed_class_info.csv", ("patientId,class\n" + "\n".join(class_rows) + "\n").encode())
    write(root / "stage_2_train_labels.csv", ("patientId,x,y,width,height,Target\n" + "\n".join(label_rows)).encode())
    return root


def test_rsna_collapses_duplicates_lists_conflicts_and_splits_three_ways(tmp_path):
    index = read(rsna_tree(tmp_path / "rsna"), val_fraction=0.25, test_fraction=0.2)
    assert index.format == "rsna-pneumonia" and index.task == "multiclass" and index.classes == RSNA_CLASSES
    total = {c: sum(index.counts(s)[c] for s in ("train", "val", "test")) for c in RSNA_CLASSES}
    assert total == {"Lung Opacity": 10, "Normal": 9, "No Lung Opacity / Not Normal": 9}
    reasons = skipped_names(index)
    assert "conflicting classes" in reasons["pid-100"]
    assert "unknown class 'Pneumothorax'" in reasons["pid-101"]
    assert "file is missing" in reasons["pid-102"]
    assert "contradicts class 'Normal'" in reasons["pid-001"]
    assert "empty file" in reasons["pid-029"]
    assert len(index.splits["test"]) in (5, 6) and len(index.splits["val"]) in (5, 6)
    assert any("1 DICOM files have no row" in n for n in index.notes)
    assert_patient_wise(index)
    binary = read(tmp_path / "rsna", variant="binary")
    assert binary.task == "binary" and sum(binary.counts(s)["Lung Opacity"] for s in binary.splits) == 10


# --- BUSI --------------------------------------------------------------------------------------------------------

def busi_tree(base: Path) -> Path:
    root = base / "Dataset_BUSI_with_GT"
    for name, n in (("benign", 6), ("malignant", 4), ("normal", 3)):
        for i in range(1, n + 1):
            image(root / name / f"{name} ({i}).png", "rgb")  # BUSI's PNGs are 3-channel
            image(root / name / f"{name} ({i})_mask.png")
    image(root / "benign" / "benign (4)_mask_1.png")
    write(base / "__MACOSX" / "Dataset_BUSI_with_GT" / "benign" / "._benign (1).png", b"\x00\x05")
    junk(root / "malignant")
    write(root / "malignant" / "malignant (5).png", b"")
    return root


def test_busi_excludes_masks_and_normal_by_default(tmp_path):
    root = busi_tree(tmp_path)
    for where in (tmp_path, root):
        index = read(where)
        assert index.format == "busi" and index.task == "binary" and index.classes == ["benign", "malignant"]
        assert {c: sum(index.counts(s)[c] for s in index.splits) for c in index.classes} == \
            {"benign": 6, "malignant": 4}
        paths = [s.path for v in index.splits.values() for s in v]
        assert not any("_mask" in Path(p).name for p in paths)
        assert len({s.patient for v in index.splits.values() for s in v}) == 10  # each image its own patient
        assert any("left out 3 'normal'" in n for n in index.notes)
        assert "empty file" in skipped_names(index)["malignant (5)"]
        assert_patient_wise(index)
    three = read(root, variant="3-class")
    assert three.task == "multiclass" and sum(three.counts(s)["normal"] for s in three.splits) == 3


# --- generic folder and CSV ----------------------------------------------------------------------------------

def test_folder_layout_with_and_without_split_folders(tmp_path):
    root = tmp_path / "xrays"
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("covid", "normal", "tb"):
            for i in range(n):
                image(root / split / cls / f"{cls}{i}.{'png' if i % 2 else 'jpg'}", "rgba" if i == 1 else "gray")
    write(root / "train" / "tb" / "scan0001", dicom_bytes((GRAY.astype(np.uint16) * 16), bits_stored=12))
    image(root / "train" / "normal" / "nested" / "deep.png")
    image(root / "train" / "stray.png")
    bad = bad_files(root / "train" / "covid", ".png")
    junk(root / "train" / "normal")
    index = read(root)
    assert index.format == "folder" and index.task == "multiclass" and index.classes == ["covid", "normal", "tb"]
    train_val = {c: index.counts("train")[c] + index.counts("val")[c] for c in index.classes}
    assert train_val == {"covid": 6, "normal": 7, "tb": 7}
    assert index.counts("test") == {"covid": 2, "normal": 2, "tb": 2}
    reasons = skipped_names(index)
    assert reasons["stray"] == "not inside a class folder"
    assert all(text in reasons[name] for name, text in bad.items())
    assert_patient_wise(index)
    flat = read(root / "train", val_fraction=0.2, test_fraction=0.25)  # class folders directly under the root
    assert flat.format == "folder" and all(flat.splits[s] for s in ("train", "val", "test"))
    assert sum(len(v) for v in flat.splits.values()) == 20


def test_folder_class_names_match_across_splits_whatever_their_case(tmp_path):
    root = tmp_path / "cxr"
    for split, names in (("train", ("EFFUSION", "NoFinding")), ("test", ("effusion", "nofinding"))):
        for cls in names:
            for i in range(3):
                image(root / split / cls / f"{cls}{i}.png")
    index = read(root, "folder", val_fraction=0.0)
    assert index.classes == ["NoFinding", "EFFUSION"]  # spelled as in train, not four; the finding is positive
    assert index.counts("test") == {"EFFUSION": 3, "NoFinding": 3}
    assert any("differing only in case" in note and "EFFUSION / effusion" in note for note in index.notes)


def test_csv_single_label_with_patients_and_splits(tmp_path):
    root = tmp_path / "table"
    rows = ["image,finding,patient_id,split"]
    for i in range(12):
        image(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{['effusion', 'normal'][i % 2]},P{i // 2},{'test' if i >= 10 else 'train'}")
    rows += ["img/missing.png,normal,P9,train", "img/0.png,effusion,P0,train", "img/3.png,,P1,train",
             "img/4.png,normal,P2,holdout"]
    write(root / "labels.csv", ("\n".join(rows) + "\n").encode())
    index = read(root, val_fraction=0.25)
    assert index.format == "csv" and index.task == "binary" and index.classes == ["normal", "effusion"]
    assert len(index.splits["test"]) == 2 and len(index.splits["train"]) + len(index.splits["val"]) == 10
    assert {s.patient for s in index.splits["test"]} == {"P5"}
    reasons = {Path(p).name: r for p, r in index.skipped}
    assert "file not found" in reasons["missing.png"] and "0.png" not in reasons  # listed twice, one label: used once
    assert any("1 file(s) listed twice with the same label" in note for note in index.notes)
    assert "empty label" in reasons["3.png"] and "holdout" in reasons["4.png"]
    assert_patient_wise(index)


def test_csv_multilabel_columns_as_classes(tmp_path):
    root = tmp_path / "multi"
    rows = ["path,Edema,Nodule,Effusion"]
    for i in range(10):
        image(root / f"{i}.jpg")
        rows.append(f"{i}.jpg,{i % 2},{int(i % 3 == 0)},{int(i > 6)}")
    rows[2] = "1.jpg,1,,0"  # a blank cell: read as 0, and said so
    rows.append("9.jpg,1,maybe,0")
    write(root / "t.csv", ("\n".join(rows) + "\n").encode())
    index = read(root / "t.csv")
    assert index.format == "csv" and index.task == "multilabel" and index.classes == ["Edema", "Nodule", "Effusion"]
    labels = {Path(s.path).name: s.label for v in index.splits.values() for s in v}
    assert labels["3.jpg"] == (1.0, 1.0, 0.0) and labels["8.jpg"] == (0.0, 0.0, 1.0) and len(labels) == 10
    assert any("is not 0 or 1" in r for _, r in index.skipped)
    assert labels["1.jpg"] == (1.0, 0.0, 0.0) and any("1 blank label cell(s) read as 0" in n for n in index.notes)


@pytest.mark.parametrize("layout", ["csv", "nih-chestxray14", "rsna-pneumonia"])
def test_a_table_that_is_not_utf8_is_one_line_naming_it(tmp_path, layout):
    """Spreadsheet programs save Latin-1/UTF-16 tables: one DataError naming the file, not a traceback."""
    if layout == "csv":
        root = tmp_path / "t"
        image(root / "a.png")
        table = root / "labels.csv"
        write(table, "path,finding\na.png,épanchement\n".encode("latin-1"))
    elif layout == "nih-chestxray14":
        root = nih_tree(tmp_path / "n")
        table = root / "Data_Entry_2017.csv"
        write(table, table.read_text().replace("Mass", "Masse é").encode("utf-16"))
    else:
        root = rsna_tree(tmp_path / "r")
        table = root / "stage_2_detailed_class_info.csv"
        write(table, table.read_bytes() + "x,Normal é\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read(root, layout)
    assert str(err.value).startswith(f"{table}: not UTF-8 text") and "\n" not in str(err.value)


def test_detection_order_and_unknown_layouts(tmp_path):
    assert [name for name, _ in DETECTORS] == ["kaggle-pneumonia", "nih-chestxray14", "rsna-pneumonia", "busi",
                                                 "csv", "folder"]
    assert set(READERS) == {name for name, _ in DETECTORS}
    assert detect_format(kaggle_tree(tmp_path / "k")) == "kaggle-pneumonia"
    assert detect_format(nih_tree(tmp_path / "n")) == "nih-chestxray14"
    assert detect_format(rsna_tree(tmp_path / "r")) == "rsna-pneumonia"
    assert detect_format(busi_tree(tmp_path / "b")) == "busi"
    write(tmp_path / "nothing" / "readme.txt", b"hello")
    with pytest.raises(DataError, match="could not tell the dataset layout"):
        detect_format(tmp_path / "nothing")
    with pytest.raises(DataError, match="not found"):
        read(tmp_path / "absent")
    with pytest.raises(DataError, match="not a Kaggle pneumonia folder"):
        read(tmp_path / "b", fmt="kaggle-pneumonia")


# --- probes of inputs users bring (bug bash): each failed on the code before its fix --------------------------

def nih_table(root: Path, rows: list[tuple[str, str, int]], *, crlf_bom: bool = True) -> Path:
    """Data_Entry_2017.csv as Excel re-saves it ('CSV UTF-8': a BOM, CRLF line endings, quoted label cells) and
    the listed images in images_001/images/."""
    lines = [",".join(CSV_COLUMNS)]
    for name, labels, patient in rows:
        lines.append(f'{name},"{labels}",0,{patient},40,M,PA,2500,2048,0.143,0.143')
        if not (root / "images_001" / "images" / name).exists():
            image(root / "images_001" / "images" / name)
    text = ("\r\n" if crlf_bom else "\n").join(lines) + "\r\n"
    return write(root / "Data_Entry_2017.csv", text.encode("utf-8-sig" if crlf_bom else "utf-8"))


NIH_SIX = [(f"0000000{p}_000.png", labels, p) for p, labels in
           enumerate(("Effusion", "No Finding", "Mass", "No Finding", "Effusion|Mass", "Mass"), start=1)]


def test_nih_image_on_two_rows_with_two_labels_is_refused_not_the_first_row_chosen(tmp_path):
    """The old reader kept the first row's label and listed the second as a 'duplicate row': a silent choice of
    one of two labels for a medical image."""
    root = tmp_path / "nih"
    nih_table(root, NIH_SIX + [("00000001_000.png", "No Finding", 1)])  # line 8 contradicts line 2
    with pytest.raises(DataError) as exc:
        read(root)
    message = str(exc.value)
    assert "\n" not in message and "00000001_000.png" in message and "line 2" in message and "line 8" in message
    assert "Effusion" in message and "no finding" in message and "data.label_conflicts" in message
    index = read(root, label_conflicts="drop-both")
    names = [Path(s.path).name for v in index.splits.values() for s in v]
    assert "00000001_000.png" not in names and len(names) == 5
    assert sum(Path(p).name == "00000001_000.png" for p, _ in index.skipped) == 2  # both rows listed


def test_nih_quoted_bom_crlf_table_reads_every_label(tmp_path):
    index = read(nih_table(tmp_path / "nih", NIH_SIX).parent)
    labels = {Path(s.path).name: s.label for v in index.splits.values() for s in v}
    assert labels == {name: vector(*([] if text == "No Finding" else text.split("|"))) for name, text, _ in NIH_SIX}


def test_nih_list_names_without_a_table_row_are_counted(tmp_path):
    """Names in the official lists that the table lacks (a cut-down table) were passed over without a word."""
    root = nih_table(tmp_path / "nih", NIH_SIX).parent
    write(root / "train_val_list.txt", "\r\n".join([n for n, _, _ in NIH_SIX[:5]] + ["00099999_000.png"]).encode())
    write(root / "test_list.txt", f"{NIH_SIX[5][0]}\r\n00099998_000.png\r\n".encode())
    index = read(root, val_fraction=0.25)
    assert [Path(s.path).name for s in index.splits["test"]] == [NIH_SIX[5][0]]
    assert any("2 names in the lists have no row in Data_Entry_2017.csv" in n for n in index.notes)


def test_hidden_folders_are_neither_classes_nor_images(tmp_path):
    """Jupyter leaves .ipynb_checkpoints/ beside and inside the class folders: the old reader made it a class (a
    3-class model for a 2-class dataset) and read its copies as images."""
    root = tmp_path / "cxr"
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(4):
            image(root / cls / f"{cls}{i}.png")
    image(root / ".ipynb_checkpoints" / "scratch-checkpoint.png")
    image(root / "NORMAL" / ".ipynb_checkpoints" / "NORMAL0-checkpoint.png")
    image(root / "PNEUMONIA" / ".git" / "x.png")
    index = read(root, "folder", val_fraction=0.0, test_fraction=0.25)
    assert index.classes == ["NORMAL", "PNEUMONIA"]
    paths = [s.path for v in index.splits.values() for s in v]
    assert len(paths) == 8 and not any("/." in p for p in paths)


def one_hot_ref(i: int, n: int) -> tuple[float, ...]:
    return tuple(float(k == i) for k in range(n))


def csv_images(folder: Path, n: int = 8) -> list[str]:
    return [str(image(folder / "imgs" / f"p{i}.png").relative_to(folder)) for i in range(n)]


def test_csv_written_by_pandas_twice_ignores_the_unnamed_index_column(tmp_path):
    """df.to_csv() keeps the index; read back and saved again it is the column 'Unnamed: 0' (0, 1, 2, ...), which
    the old reader took as a second label: a multi-label task with a class 'Unnamed: 0' and rows 2+ skipped."""
    pd = pytest.importorskip("pandas")
    paths = csv_images(tmp_path)
    pd.DataFrame({"path": paths, "pneumonia": [i % 2 for i in range(8)]}).to_csv(tmp_path / "first.csv")
    pd.read_csv(tmp_path / "first.csv").to_csv(tmp_path / "labels.csv", index=False)
    assert (tmp_path / "labels.csv").read_text().splitlines()[0] == "Unnamed: 0,path,pneumonia"
    (tmp_path / "first.csv").unlink()
    index = read(tmp_path / "labels.csv", val_fraction=0.0, test_fraction=0.25)
    assert index.task == "binary" and index.classes == ["0", "1"] and not index.skipped
    labels = {Path(s.path).name: s.label for v in index.splits.values() for s in v}
    assert labels == {f"p{i}.png": one_hot_ref(i % 2, 2) for i in range(8)}


def test_csv_labels_spelling_one_number_are_one_class(tmp_path):
    """A label column partly rewritten as floats (1 and 1.0) was four classes: 0, 0.0, 1, 1.0."""
    paths = csv_images(tmp_path)
    cells = ["0", "1", "1.0", "0.0"] * 2
    write(tmp_path / "t.csv", ("path,label\r\n" + "".join(f"{p},{c}\r\n" for p, c in zip(paths, cells))).encode())
    index = read(tmp_path / "t.csv", val_fraction=0.0, test_fraction=0.25)
    assert index.classes == ["0", "1"]
    labels = {Path(s.path).name: s.label for v in index.splits.values() for s in v}
    assert labels == {f"p{i}.png": one_hot_ref(int(float(c)), 2) for i, c in enumerate(cells)}


def test_csv_column_named_twice_is_refused(tmp_path):
    """Two 'Effusion' columns made two classes of one name, silently."""
    paths = csv_images(tmp_path)
    write(tmp_path / "t.csv", ("path,Effusion,Mass,Effusion\n" + "".join(f"{p},1,0,0\n" for p in paths)).encode())
    with pytest.raises(DataError, match=r"t\.csv: column 'Effusion' appears twice in the header \(columns 2 and 4\)"):
        read(tmp_path / "t.csv")


def test_csv_written_on_windows_with_backslashes_finds_its_files(tmp_path):
    paths = csv_images(tmp_path)
    rows = "".join(f"{p.replace('/', chr(92))},{'AB'[i % 2]}\r\n" for i, p in enumerate(paths))
    write(tmp_path / "t.csv", ("path,label\r\n" + rows).encode())
    index = read(tmp_path / "t.csv", val_fraction=0.0, test_fraction=0.25)
    found = sorted(Path(s.path).name for v in index.splits.values() for s in v)
    assert found == sorted(Path(p).name for p in paths) and not index.skipped


def split_tree(root: Path, splits: tuple[str, ...]) -> Path:
    for split in splits:
        for cls in ("a", "b"):
            for i in range(3):
                image(root / split / cls / f"{split}-{cls}{i}.png")
    return root


def test_folder_dev_split_is_validation_and_other_folders_are_named(tmp_path):
    """dev/ beside train/ and test/ (and any other folder there) was left out without a word."""
    index = read(split_tree(tmp_path / "d", ("train", "dev", "test", "extra")), val_split="official")
    assert sorted(Path(s.path).name for s in index.splits["val"]) == [f"dev-{c}{i}.png" for c in "ab" for i in range(3)]
    assert any("not read: extra/" in note for note in index.notes)


def test_folder_split_given_by_two_folders_is_refused(tmp_path):
    """val/ and validation/ side by side: one of them was read, the other dropped silently."""
    with pytest.raises(DataError, match=r"val/ and validation/ are all the val split"):
        read(split_tree(tmp_path / "d", ("train", "val", "validation", "test")))


@pytest.mark.parametrize("rare, flagged", [("PNEUMONIAA", True), ("Pneumonia ", False), ("PNEUMONIA2", False)])
def test_a_misspelt_label_of_a_few_rows_is_a_warning(tmp_path, rare, flagged):
    """'PNEUMONIAA' on one row of a hand-typed table became a third class without a word. Case and spacing were
    already one class; a name differing only in digits is a class of its own (not flagged)."""
    from medq.data.readers import class_warnings

    paths = csv_images(tmp_path, 21)
    cells = ["NORMAL", "PNEUMONIA"] * 10 + [rare]
    write(tmp_path / "t.csv", ("path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, cells))).encode())
    index = read(tmp_path / "t.csv", val_fraction=0.0, test_fraction=0.0)
    said = [w for w in class_warnings(index) if "spelt like" in w]
    assert said == ([f"class 'PNEUMONIAA' has 1 image(s) and is spelt like 'PNEUMONIA' (10): a misspelt label trains "
                     "as a class of its own; correct the label, or ignore this if 'PNEUMONIAA' is meant"]
                    if flagged else [])


def test_busi_mask_copies_made_by_a_file_manager_are_masks_not_images(tmp_path):
    """'benign (1)_mask (1).png' (a browser's second download) and '_mask copy.png' (macOS Duplicate) were read as
    images of their class: a lesion outline trained as an ultrasound."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    for name, n in (("benign", 5), ("malignant", 5)):
        for i in range(1, n + 1):
            image(root / name / f"{name} ({i}).png", "rgb")
            image(root / name / f"{name} ({i})_mask.png")
    image(root / "benign" / "benign (1)_mask (1).png")
    image(root / "benign" / "benign (2)_mask_1 copy.png")
    image(root / "malignant" / "malignant (3)_MASK_2.png")
    index = read(root, val_fraction=0.2, test_fraction=0.2)
    names = sorted(Path(s.path).name for v in index.splits.values() for s in v)
    assert names == sorted(f"{c} ({i}).png" for c in ("benign", "malignant") for i in range(1, 6))
    assert any("ignored 13 segmentation masks" in n and "no mask" not in n for n in index.notes)


def test_nih_finding_spelt_otherwise_is_that_finding_with_a_note(tmp_path):
    """'Pleural Thickening' (a re-typed table) skipped every such row: the finding left training altogether."""
    rows = [(n, t, p) for n, t, p in NIH_SIX]
    rows[0] = (rows[0][0], "Pleural Thickening|effusion", 1)
    rows[1] = (rows[1][0], "no finding", 2)
    rows[2] = (rows[2][0], "Pleural-Effusion", 3)  # not a CheXNet name in any spelling: a listed skip
    index = read(nih_table(tmp_path / "nih", rows).parent)
    labels = {Path(s.path).name: s.label for v in index.splits.values() for s in v}
    assert labels[rows[0][0]] == vector("Pleural_Thickening", "Effusion") and labels[rows[1][0]] == vector()
    assert "unknown finding 'Pleural-Effusion'" in skipped_names(index)[Path(rows[2][0]).stem]
    assert any("'Pleural Thickening' → 'Pleural_Thickening'" in n and "'effusion' → 'Effusion'" in n
               for n in index.notes)


@pytest.mark.parametrize("names, positive", [(("cancer", "normal"), "cancer"), (("Healthy", "COVID-19"), "COVID-19"),
                                             (("NORMAL", "PNEUMONIA"), "PNEUMONIA"), (("a", "b"), "b")])
def test_binary_positive_class_is_the_disease_not_the_alphabets_second(tmp_path, names, positive):
    """Binary metrics and thresholds are about the second class: folders cancer/ and normal/ made 'normal' the
    positive class, so the reported sensitivity was the specificity for cancer."""
    root = tmp_path / "d"
    for cls in names:
        for i in range(4):
            image(root / cls / f"{cls}{i}.png")
    for index in (read(root, "folder", val_fraction=0.0, test_fraction=0.25),
                  read(write(tmp_path / "t.csv", ("path,label\n" + "".join(
                      f"d/{c}/{c}{i}.png,{c}\n" for c in names for i in range(4))).encode()),
                       val_fraction=0.0, test_fraction=0.25)):
        assert index.classes[1] == positive and len(index.classes) == 2
        for s in (s for v in index.splits.values() for s in v):
            assert s.label == ((0.0, 1.0) if Path(s.path).parent.name == positive else (1.0, 0.0))
        assert any(f"positive class: {positive!r}" in n for n in index.notes)
