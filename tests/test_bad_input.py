"""What a careful new user broke in an afternoon (issue 12): each test is one wrong input or everyday step, and what
medq must do with it — a listed skip with the reason, or one line saying what is wrong and how to fix it."""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.config import DataConfig, check_run_name, load_config
from medq.data.decode import UnreadableImage, check_header, decode_image
from medq.data.readers import read_dataset
from medq.errors import ConfigError, DataError, MedqError

REPO = Path(__file__).resolve().parents[1]


# --- files with something wrong inside ----------------------------------------------------------------------------

def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def good_jpeg(path: Path, seed: int = 0, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    pixels = cv2.GaussianBlur((rng.random((size, size)) * 255).astype(np.uint8), (5, 5), 0)
    return write(path, cv2.imencode(".jpg", pixels)[1].tobytes())


def corrupt_body_jpeg(path: Path) -> Path:
    """A JPEG whose markers (SOI, SOF, SOS, EOI) are intact but whose entropy-coded body is overwritten: OpenCV
    decodes it to grey garbage and libjpeg only warns on stderr."""
    raw = bytearray(good_jpeg(path).read_bytes())
    sos = raw.find(b"\xff\xda")
    start, end = sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big"), raw.rfind(b"\xff\xd9")
    rng = np.random.default_rng(3)
    middle = start + (end - start) // 3
    raw[middle:middle + 40] = bytes(int(b) for b in rng.integers(0, 0xFE, 40))
    return write(path, bytes(raw))


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small, valid-looking PNG whose IHDR claims ``width`` × ``height`` pixels (a decompression bomb's header)."""
    raw = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return write(path, bytes(raw))


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    raw = bytearray(good_jpeg(path).read_bytes())
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return write(path, bytes(raw))


def kaggle_tree(root: Path, per_class: int = 6) -> Path:
    for s, split in enumerate(("train", "test")):  # every file another image (identical bytes would be copies)
        for k, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(per_class):
                good_jpeg(root / split / cls / f"{cls.lower()}-{i}.jpeg", seed=1000 * s + 100 * k + i)
    return root


def read(root: Path, fmt: str = "auto", **kw):
    return read_dataset(DataConfig(format=fmt, root=str(root), **kw), seed=42)


# --- 1. a corrupt JPEG body is unreadable, with the reason, and without libjpeg's noise ------------------------------

def test_a_corrupt_jpeg_body_is_unreadable_and_libjpeg_stays_off_the_terminal(tmp_path, capfd):
    bad = corrupt_body_jpeg(tmp_path / "grey.jpeg")
    assert check_header(bad) is None  # the markers are intact: only decoding can tell
    with pytest.raises(UnreadableImage, match=r"grey.jpeg: corrupt JPEG data \(libjpeg: Corrupt JPEG data"):
        decode_image(bad)
    assert "Corrupt JPEG" not in capfd.readouterr().err
    assert decode_image(good_jpeg(tmp_path / "fine.jpeg"))[0].shape == (48, 48)


def test_data_check_lists_the_corrupt_jpeg_as_unreadable(tmp_path, capfd):
    from medq.data.check import check_dataset, format_check_report

    root = kaggle_tree(tmp_path / "chest_xray")
    bad = corrupt_body_jpeg(root / "train" / "PNEUMONIA" / "grey.jpeg")
    report = check_dataset(root)
    assert [u["path"] for u in report["unreadable"]] == [str(bad)] and not report["ok"]
    assert "corrupt JPEG data" in report["unreadable"][0]["reason"]
    assert f"{bad}: corrupt JPEG data" in format_check_report(report)
    assert "Corrupt JPEG" not in capfd.readouterr().err


def test_the_data_stage_moves_the_corrupt_jpeg_to_skipped(tmp_path):
    from medq.data.check import verify_images

    root = kaggle_tree(tmp_path / "chest_xray")
    bad = corrupt_body_jpeg(root / "train" / "NORMAL" / "grey.jpeg")
    index = verify_images(read(root))
    assert str(bad) not in [s.path for samples in index.splits.values() for s in samples]
    assert [(p, "corrupt JPEG data" in r) for p, r in index.skipped] == [(str(bad), True)]


def test_training_loader_drops_the_corrupt_jpeg_with_the_reason(tmp_path):
    from medq.preprocess import PreprocessSpec
    from medq.tfdata import load_split_arrays

    paths = [str(good_jpeg(tmp_path / "a.jpeg")), str(corrupt_body_jpeg(tmp_path / "b.jpeg"))]
    dropped: dict[str, str] = {}
    images, kept = load_split_arrays(paths, PreprocessSpec(32, 1, "unit"), dropped)
    assert list(kept) == [0] and len(images) == 1
    assert list(dropped) == [paths[1]] and "corrupt JPEG data" in dropped[paths[1]]


def test_predict_reports_the_corrupt_jpeg_instead_of_a_confident_class(tmp_path):
    from medq.predict import ImageInput, RunInfo, iter_predictions
    from medq.preprocess import PreprocessSpec

    class Confident:  # a model that would call anything PNEUMONIA at 0.999
        info = RunInfo(tmp_path, ["NORMAL", "PNEUMONIA"], "binary", PreprocessSpec(32, 1, "unit"))

        def __call__(self, x, batch_size):
            return np.tile([[0.001, 0.999]], (len(x), 1))

    items = [ImageInput(good_jpeg(tmp_path / "a.jpeg")), ImageInput(corrupt_body_jpeg(tmp_path / "b.jpeg"))]
    records = list(iter_predictions(Confident(), items, quiet=True))
    assert records[0]["prediction"] == "PNEUMONIA"
    assert "probabilities" not in records[1] and records[1]["error"].startswith("corrupt JPEG data")


# --- 2. phantoms only where asked, and every report says when they were used --------------------------------------

PHANTOM = ["data.phantom.n_train=16", "data.phantom.n_val=8", "data.phantom.n_test=8", "data.phantom.size=32"]


def test_a_missing_folder_elsewhere_is_an_error_saying_what_was_expected(tmp_path):
    from medq.pipeline import ensure_phantoms

    typo = tmp_path / "chest_xary"
    config = load_config(REPO / "configs" / "default.yaml", [f"data.root={typo}", *PHANTOM])
    with pytest.raises(DataError) as err:
        ensure_phantoms(config)
    message = str(err.value)
    assert message.startswith(f"{typo}: dataset folder not found; expected the Kaggle chest_xray folder")
    assert "--phantoms" in message and "\n" not in message and not typo.exists()
    assert ensure_phantoms(config, phantoms=True) and (typo / "train" / "NORMAL").is_dir()


def test_a_data_dir_without_the_dataset_folder_is_an_error(tmp_path, monkeypatch):
    from medq.pipeline import ensure_phantoms

    (tmp_path / "datasets" / "chest-xray").mkdir(parents=True)  # the subfolder misnamed
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "datasets"))
    with pytest.raises(DataError, match="chest_xray: dataset folder not found; expected"):
        ensure_phantoms(load_config(REPO / "configs" / "default.yaml", PHANTOM))
    assert not (tmp_path / "datasets" / "chest_xray").exists()


def test_the_built_in_location_generates_and_the_manifest_says_synthetic_phantoms(tmp_path, monkeypatch):
    from medq import runrecord
    from medq.pipeline import run_data
    from medq.runs import format_run, format_runs, list_runs, run_summary

    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the built-in location is data/chest_xray under the working directory
    config = load_config(REPO / "configs" / "default.yaml", [f"run.output_dir={tmp_path / 'out'}", *PHANTOM])
    run_data(config)
    assert (tmp_path / "data" / "chest_xray" / "train").is_dir()
    manifest = runrecord.read_manifest(config.run_dir)
    assert manifest["data_source"] == "synthetic phantoms (kaggle-pneumonia layout)"
    assert "synthetic phantoms" in format_runs(list_runs(tmp_path / "out"), tmp_path / "out")
    assert "data        synthetic phantoms (kaggle-pneumonia layout) at" in format_run(run_summary(config.run_dir))


def test_real_data_is_recorded_as_its_layout(tmp_path):
    from medq import runrecord
    from medq.pipeline import run_data

    root = kaggle_tree(tmp_path / "chest_xray")
    run_data(load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}"]))
    assert runrecord.read_manifest(tmp_path / "out" / "default")["data_source"] == "kaggle-pneumonia"


def test_medq_data_phantoms_flag_generates_anywhere(tmp_path, capsys):
    from medq.cli import main

    root = tmp_path / "elsewhere" / "chest_xray"
    argv = ["data", "--quiet", "--set", f"data.root={root}", "--set", f"run.output_dir={tmp_path / 'out'}"]
    argv += [a for o in PHANTOM for a in ("--set", o)]
    assert main(argv) == 2 and "--phantoms" in capsys.readouterr().err and not root.exists()
    assert main([*argv, "--phantoms"]) == 0 and (root / "test").is_dir()


def test_benchmark_markdown_and_predict_name_the_data_source(tmp_path):
    from medq import runrecord
    from medq.benchmark.report import markdown
    from medq.predict import PredictSummary, read_run

    rep = {"run": "r", "created_at": "now", "task": "binary", "classes": ["a", "b"], "objective": "accuracy",
           "baseline": "tensorflow-fp32", "data_source": "synthetic phantoms (kaggle-pneumonia layout)",
           "inputs": {"path": "x.npy", "sha256": "0" * 64, "n_images": 4},
           "settings": {"warmup": 1, "latency_iterations": 2, "throughput_iterations": 1, "batch_size": 4,
                        "batch_sizes": [4]},
           "environment": {"cpu": {}, "thread_environment": {}, "versions": {}}, "results": [], "skipped": []}
    assert "data: synthetic phantoms (kaggle-pneumonia layout)" in markdown(rep).splitlines()[2]
    run = tmp_path / "run"
    runrecord.commit(run, "train", facts={"classes": ["a", "b"], "task": "binary", "data_source": "busi",
                                          "preprocess": {"image_size": 32, "channels": 1, "normalization": "unit"}})
    info = read_run(run)
    assert info.data_source == "busi"
    assert "(trained on busi)" in PredictSummary(predicted=1, model="fp32", data_source=info.data_source).line()


# --- 3. class names that differ only in case ------------------------------------------------------------------------

def test_csv_labels_differing_only_in_case_are_one_class(tmp_path):
    rows = ["path,label"]
    for i, label in enumerate(["NORMAL", "normal", "NORMAL", "PNEUMONIA", "Pneumonia", "PNEUMONIA"] * 2):
        good_jpeg(tmp_path / f"{i}.jpeg", seed=i)
        rows.append(f"{i}.jpeg,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    index = read(tmp_path / "labels.csv", test_fraction=0.0)
    assert index.classes == ["NORMAL", "PNEUMONIA"]
    assert sum(len(s) for s in index.splits.values()) == 12 and not index.skipped
    assert any("differing only in case" in n and "NORMAL / normal → NORMAL" in n for n in index.notes)


def test_a_lowercase_class_folder_beside_the_kaggle_one_is_merged_not_dropped(tmp_path):
    root = kaggle_tree(tmp_path / "chest_xray", per_class=3)
    for i in range(3):
        good_jpeg(root / "train" / "normal" / f"extra-{i}.jpeg", seed=50 + i)
    index = read(root)
    train_and_val = index.splits["train"] + index.splits["val"]
    assert len(train_and_val) == 9 and sum(1 for s in train_and_val if "extra-" in s.path) == 3
    assert all(s.label == (1.0, 0.0) for s in train_and_val if "extra-" in s.path)
    assert any("differing only in case" in n and "train/normal" in n for n in index.notes)


def test_busi_class_folders_differing_only_in_case_are_merged(tmp_path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    for f, (folder, n) in enumerate((("benign", 3), ("Benign", 2), ("malignant", 3))):
        for i in range(n):  # every file another image (identical bytes would be copies)
            write(base / folder / f"{folder} ({i}).png",
                  cv2.imencode(".png", np.full((16, 16), 9 * i + 40 * f, np.uint8))[1])
    index = read(base, test_fraction=0.0)
    assert sum(len(v) for v in index.splits.values()) == 8
    assert any("differing only in case" in n and "Benign / benign" in n for n in index.notes)


# --- 4. training lists what it skipped ------------------------------------------------------------------------------

def test_training_prints_the_skip_count_and_writes_the_list_into_the_run(tmp_path, caplog):
    from medq import runrecord
    from medq.train import run_train

    root = kaggle_tree(tmp_path / "chest_xray", per_class=8)
    write(root / "train" / "NORMAL" / "empty.jpeg", b"")
    write(root / "train" / "PNEUMONIA" / "page.jpeg", b"<html>404</html>")
    corrupt = corrupt_body_jpeg(root / "train" / "PNEUMONIA" / "grey.jpeg")
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}", "data.val_fraction=0.3",
                                "preprocess.image_size=32", "train.epochs=1", "train.batch_size=8",
                                "train.tensorboard=false", "model.params={blocks: 1, filters: 4, dense_units: 4}"])
    logging.getLogger("medq").addHandler(caplog.handler)  # the CLI's setup stops medq's records propagating
    run_train(config)
    listed = runrecord.verified_path(config.run_dir, "skipped_files", config)
    rows = list(csv.DictReader(listed.open()))
    reasons = {Path(r["path"]).name: r["reason"] for r in rows}
    assert set(reasons) == {"empty.jpeg", "page.jpeg", corrupt.name}
    assert reasons["empty.jpeg"].startswith("empty file") and "corrupt JPEG data" in reasons[corrupt.name]
    assert f"3 file(s) left out (unreadable or unlabelled); the list with each reason is in {listed}" in caplog.text


# --- 5. CSV tables that are not what they seem ----------------------------------------------------------------------

def _csv_images(folder: Path, n: int = 6) -> list[str]:
    return [good_jpeg(folder / f"{i}.jpeg", seed=i).name for i in range(n)]


def test_an_extra_metadata_column_says_what_is_wrong_with_the_table(tmp_path):
    names = _csv_images(tmp_path)
    rows = ["path,label,age"] + [f"{n},{'NORMAL' if i % 2 else 'PNEUMONIA'},{40 + i}" for i, n in enumerate(names)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read(tmp_path / "labels.csv")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'labels.csv'}: every column besides 'path' is read as a label")
    assert "'age' holds '40'" in message and "remove metadata columns such as age" in message


def test_a_utf16_table_is_an_encoding_message(tmp_path):
    names = _csv_images(tmp_path)
    text = "path,label\n" + "".join(f"{n},{'a' if i % 2 else 'b'}\n" for i, n in enumerate(names))
    (tmp_path / "labels.csv").write_bytes(text.encode("utf-16"))
    for root in (tmp_path / "labels.csv", tmp_path):  # the table itself, or the folder holding it (detected)
        with pytest.raises(DataError, match=r"labels.csv: not UTF-8 text but UTF-16 .*save the table as UTF-8 CSV"):
            read(root)


def test_a_semicolon_separated_table_says_so(tmp_path):
    names = _csv_images(tmp_path)
    text = "path;label\n" + "".join(f"{n};{'a' if i % 2 else 'b'}\n" for i, n in enumerate(names))
    (tmp_path / "labels.csv").write_text(text)
    for root in (tmp_path / "labels.csv", tmp_path):
        with pytest.raises(DataError, match="labels.csv: the columns are separated by semicolons, not commas"):
            read(root)


# --- 7. predict's outputs are checked before any work ---------------------------------------------------------------

@pytest.fixture
def model_less_run(tmp_path):
    """A run with classes and preprocessing but no model: any check that comes after loading it never runs."""
    from medq import runrecord

    run = tmp_path / "run"
    runrecord.commit(run, "train", facts={"classes": ["NORMAL", "PNEUMONIA"], "task": "binary",
                                          "preprocess": {"image_size": 32, "channels": 1, "normalization": "unit"}})
    return run


def test_predict_output_naming_a_folder_is_an_error_up_front(tmp_path, model_less_run):
    from medq.predict import run_predict

    image = good_jpeg(tmp_path / "in" / "a.jpeg")
    (tmp_path / "preds").mkdir()
    with pytest.raises(MedqError, match=r"preds: is a folder; -o takes a file name"):
        run_predict(model_less_run, [image], output=tmp_path / "preds")


def test_predict_heatmap_naming_a_file_is_an_error_up_front(tmp_path, model_less_run):
    from medq.predict import run_predict

    image = good_jpeg(tmp_path / "in" / "a.jpeg")
    taken = write(tmp_path / "maps.png", b"x")
    with pytest.raises(MedqError, match=r"maps.png: is a file; --heatmap takes a folder"):
        run_predict(model_less_run, [image], heatmap_dir=taken)


def test_predict_never_overwrites_a_heatmap_it_did_not_write_unless_told(tmp_path, model_less_run):
    from medq.predict import run_predict

    image = good_jpeg(tmp_path / "in" / "a.jpeg")
    mine = write(tmp_path / "maps" / "a_PNEUMONIA.png", b"the user's own file")
    with pytest.raises(MedqError, match=r"a_PNEUMONIA.png: already exists; .*pass --overwrite"):
        run_predict(model_less_run, [image], heatmap_dir=tmp_path / "maps")
    assert mine.read_bytes() == b"the user's own file"
    with pytest.raises(MedqError, match="no FP32 model"):  # with --overwrite the output check passes
        run_predict(model_less_run, [image], heatmap_dir=tmp_path / "maps", overwrite=True)


# --- 8. decompression bombs ----------------------------------------------------------------------------------------

def test_a_png_header_claiming_60000_squared_is_refused_with_medqs_message(tmp_path, capfd):
    bomb = png_claiming(tmp_path / "bomb.png", 60_000, 60_000)
    assert check_header(bomb).startswith("60000×60000 pixels (3,600 megapixels) is above data.max_megapixels (100)")
    with pytest.raises(UnreadableImage, match=r"bomb.png: 60000×60000 pixels .* raise data.max_megapixels"):
        decode_image(bomb)
    assert "OpenCV" not in capfd.readouterr().err


def test_a_jpeg_header_over_the_limit_is_refused(tmp_path):
    bomb = jpeg_claiming(tmp_path / "big.jpeg", 20_000, 20_000)
    assert "400 megapixels) is above data.max_megapixels (100)" in check_header(bomb)
    assert check_header(bomb, max_megapixels=500) is None


def test_a_dicom_claiming_too_many_pixels_is_refused_before_its_pixel_data(tmp_path):
    import pydicom

    from medq.data.dicom import dicom_bytes

    path = write(tmp_path / "big.dcm", dicom_bytes(np.zeros((8, 8), np.uint16), bits_stored=12))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60_000, 60_000
    ds.save_as(path)
    with pytest.raises(UnreadableImage, match=r"big.dcm: 60000×60000 pixels .* above data.max_megapixels \(100\)"):
        decode_image(path)


def test_images_over_max_megapixels_are_listed_skips(tmp_path):
    root = kaggle_tree(tmp_path / "chest_xray")
    bomb = png_claiming(root / "train" / "NORMAL" / "bomb.png", 32_000, 32_000)
    index = read(root)
    assert [p for p, _ in index.skipped] == [str(bomb)] and "1,024 megapixels" in index.skipped[0][1]
    raised = read(root, max_megapixels=2000)  # the configured limit reaches the readers (indexing reads headers)
    assert not raised.skipped and str(bomb) in [s.path for v in raised.splits.values() for s in v]
    with pytest.raises(ConfigError, match="data.max_megapixels: must be greater than 0"):
        load_config(None, ["data.max_megapixels=0"])


def test_data_check_above_its_decode_threshold_still_lists_the_bomb(tmp_path):
    from medq.data.check import check_dataset

    root = kaggle_tree(tmp_path / "chest_xray")
    bomb = png_claiming(root / "test" / "PNEUMONIA" / "bomb.png", 60_000, 60_000)
    report = check_dataset(root, verify_all_up_to=0, sample_per_split=2)  # headers for all, decodes for a sample
    assert report["verified"] == "sample"
    assert [u["path"] for u in report["unreadable"]] == [str(bomb)]


# --- 9. small ones --------------------------------------------------------------------------------------------------

def test_an_empty_part_in_a_set_key_is_an_error():
    with pytest.raises(ConfigError, match=r"--set 'run..name=x': 'run..name' has an empty part"):
        load_config(None, ["run..name=x"])


def test_an_error_in_a_set_value_names_set_not_the_config_file():
    config_file = REPO / "configs" / "default.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(config_file, ["train.epochs=0"])
    assert str(err.value).startswith("--set train.epochs=0: train.epochs: must be greater than 0")
    with pytest.raises(ConfigError, match=r"^--set data.roott=x: data: unknown key 'roott'"):
        load_config(config_file, ["data.roott=x"])


def _medq(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MEDQ_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-m", "medq", *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_runs_show_into_a_closed_pipe_exits_quietly(tmp_path, model_less_run):
    process = _medq("runs", "show", str(model_less_run), "--json", stdout=subprocess.PIPE)
    process.stdout.close()  # `| head` that has already exited
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err


def test_runs_show_reports_the_selected_models_own_hyperparameters(tmp_path):
    from medq import runrecord
    from medq.runs import format_run, run_summary

    config = load_config(None, [f"run.output_dir={tmp_path}", "train.learning_rate=0.001", "train.batch_size=32"])
    runrecord.commit(config.run_dir, "tune", config=config, facts={
        "model_source": "tune", "selected_hyperparameters": {"learning_rate": 0.003, "batch_size": 16}})
    text = format_run(run_summary(config.run_dir))
    assert "selected    learning_rate 0.003, batch_size 16  (from tune)" in text


def test_predict_refuses_both_run_and_run_name(tmp_path, capsys):
    from medq.cli import main

    assert main(["predict", "--run", "output/a", "--run-name", "b", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "medq predict: error: --run output/a and --run-name b both name the run; give one of them"


def test_version(capsys):
    from medq import __version__
    from medq.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"medq {__version__}"


def test_data_check_lists_its_format_and_variant_choices(capsys):
    from medq.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["data"].format_help().split())
    listed = help_text.split("the layout, one of ", 1)[1].split(" (default", 1)[0]
    assert sorted(listed.split(", ")) == sorted(["auto", "kaggle-pneumonia", "nih-chestxray14", "rsna-pneumonia", "busi",
                                                 "folder", "csv"])
    assert "one of binary, 3-class, 14-label" in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "check", "x", "--variant", "3class"])
    assert "invalid choice: '3class' (choose from 'binary', '3-class', '14-label')" in capsys.readouterr().err


# --- everyday use ---------------------------------------------------------------------------------------------------

def test_an_interrupted_training_names_the_command_that_continues_it(tmp_path, monkeypatch, capsys):
    import medq.train
    from medq.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medq.train, "run_train", interrupted)
    out = str(tmp_path / "out")
    assert main(["train", "--run-name", "r1", "--set", f"run.output_dir={out}", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"`medq train --run-name r1 --set run.output_dir={out} --quiet --resume` continues the training" in err


def test_image_verification_and_calibration_show_progress(tmp_path, monkeypatch, capsys):
    from medq.data.check import verify_images
    from medq.inc.adapters import CalibrationLoader

    monkeypatch.setenv("MEDQ_PROGRESS", "1")  # forced on although stderr is not a terminal here
    verify_images(read(kaggle_tree(tmp_path / "chest_xray")))
    loader = CalibrationLoader(np.zeros((8, 4, 4, 1), np.float32), np.zeros((8, 2), np.float32),
                               [f"{i}.png" for i in range(8)], 4)
    assert len(list(loader)) == 2
    err = capsys.readouterr().err
    assert "verify train images" in err and "calibrate" in err
    monkeypatch.setenv("MEDQ_PROGRESS", "0")
    list(loader)
    assert "calibrate" not in capsys.readouterr().err


def test_inc_trials_advance_the_bar_once_per_evaluation_even_when_one_fails():
    from types import SimpleNamespace

    from medq.progress import counting

    bar = SimpleNamespace(n=0)
    bar.update = lambda k: setattr(bar, "n", bar.n + k)

    def evaluate(graph):
        if graph == "broken":
            raise ValueError(graph)
        return 0.9

    counted = counting(evaluate, bar)
    assert counted("fp32") == 0.9 and counted("trial-1") == 0.9
    with pytest.raises(ValueError):
        counted("broken")
    assert bar.n == 3


def test_benchmark_rounds_run_every_row_once_per_round_drop_a_failed_row_and_show_progress(tmp_path, monkeypatch,
                                                                                            capsys):
    from types import SimpleNamespace

    import medq.benchmark.runner as runner

    monkeypatch.setenv("MEDQ_PROGRESS", "1")
    ran = []

    def worker(job, *args):
        ran.append(job["id"])
        if job["id"] == "row1":
            raise runner.WorkerError("row1's worker crashed")
        return {"pid": len(ran), "command": [], "log": "", **job}

    bars = []
    shown = runner.progress

    @contextlib.contextmanager
    def counted(**kwargs):
        with shown(**kwargs) as bar:
            steps = []
            original = bar.update
            bar.update = lambda k=1: (steps.append(k), original(k))
            yield bar
        bars.append((kwargs["desc"], kwargs["total"], sum(steps)))

    monkeypatch.setattr(runner, "run_worker", worker)
    monkeypatch.setattr(runner, "progress", counted)
    rows = [SimpleNamespace(id=f"row{i}", model=Path(f"m{i}.pb")) for i in range(3)]
    measuring = SimpleNamespace(job=lambda row: {"id": row.id}, settings=SimpleNamespace(repeats=2, worker_timeout=1),
                                bench=tmp_path, env={}, verbose=False)
    skipped = {}
    measured = runner._measure_rounds(rows, measuring, skipped)
    assert ran == ["row0", "row1", "row2", "row0~2", "row2~2"]  # the failed row is not run again in round 2
    assert {k: [r["id"] for r in v] for k, v in measured.items()} == {"row0": ["row0", "row0~2"],
                                                                      "row2": ["row2", "row2~2"]}
    assert skipped == {"row1": "failed: row1's worker crashed"}
    assert "benchmark rows" in capsys.readouterr().err
    assert bars == [("benchmark rows", 6, 6)]  # every row of every round advances the bar, a failed one too


def _raised(action) -> str:
    with pytest.raises(MedqError) as err:
        action()
    return str(err.value)


def test_the_readme_troubleshooting_quotes_the_messages_medq_prints(tmp_path):
    """Each excerpt below is quoted in the README's table, and each of its parts (between '...') is in the message
    the code really prints for that mistake: a reworded message or a stale README fails here."""
    from medq.data.common import read_text
    from medq.pipeline import ensure_phantoms

    readme = (REPO / "README.md").read_text()
    assert "MEDQ_PROGRESS" in readme and "## Troubleshooting" in readme
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    utf16, latin1 = tmp_path / "utf16.csv", tmp_path / "latin1.csv"
    utf16.write_bytes("path,label\n".encode("utf-16"))
    latin1.write_bytes("path,label\nR\xf6ntgen.png,a\n".encode("latin-1"))
    names = _csv_images(tmp_path / "semicolons")
    (tmp_path / "semicolons" / "labels.csv").write_text("path;label\n" + "".join(f"{n};a\n" for n in names))
    typo = tmp_path / "chest_xary"
    messages = {
        "dataset folder not found; expected the Kaggle chest_xray folder ...": _raised(lambda: ensure_phantoms(
            load_config(REPO / "configs" / "default.yaml", [f"data.root={typo}", *PHANTOM]))),
        "not UTF-8 text but UTF-16": _raised(lambda: read_text(utf16)),
        "not UTF-8 text (byte N ...)": re.sub(r"byte \d+", "byte N", _raised(lambda: read_text(latin1))),
        "the columns are separated by semicolons, not commas": _raised(lambda: read(tmp_path / "semicolons")),
        "--set 'run..name=x': ... has an empty part": _raised(lambda: load_config(None, ["run..name=x"])),
        "--run-name: the run name is empty": _raised(lambda: check_run_name("", "--run-name")),
    }
    for excerpt, message in messages.items():
        assert f"`{excerpt}`" in section or f"`{excerpt} " in section, f"the README does not quote {excerpt!r}"
        parts = [part.strip() for part in excerpt.split("...") if part.strip()]
        assert all(part in message for part in parts), f"README: {excerpt!r}; medq prints: {message!r}"
        assert "\n" not in message