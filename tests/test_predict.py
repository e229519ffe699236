"""`medq predict`: the same probabilities as the evaluation path, for PNG, JPEG and DICOM; heatmaps; ten-crop; bad
input; and the plain-TensorFlow deploy snippet of docs/deploy.md, run against a tiny trained and quantized run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from medq import runrecord
from medq.cli import main
from medq.data.dicom import dicom_bytes, load_dicom
from medq.graph import FrozenGraph
from medq.predict import (ImageInput, Predictor, RunInfo, collect_inputs, iter_predictions, model_location,
                          read_run, record, run_predict)
from medq.preprocess import PreprocessSpec, load_batch
from medq.tta import ten_crops

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny_run):
    """A 32-px refkit-cnn trained 2 epochs on 60 phantom radiographs, frozen and (if INC can) quantized."""
    run = make_tiny_run(tmp_path_factory.mktemp("predict"))
    return SimpleNamespace(**vars(run), spec=PreprocessSpec(32, 1, "unit"))


def _frozen_probs(pb: Path, files: list[str], spec: PreprocessSpec) -> np.ndarray:
    """The evaluation/benchmark path: FrozenGraph.predict on medq.preprocess.load_batch."""
    graph = FrozenGraph(pb)
    try:
        return graph.predict(load_batch(files, spec), batch_size=8)
    finally:
        graph.close()


def _reference_probs(pb: Path, images: list, size: int) -> np.ndarray:
    """The oracle, sharing no code with medq: each image (a file OpenCV decodes, or gray uint8 pixels) resized to
    ``size`` as the preprocessing is specified (OpenCV, area when shrinking, bilinear when enlarging), scaled by
    1/255, and the frozen graph run by plain TensorFlow."""
    import tensorflow as tf

    batch = []
    for image in images:
        gray = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE) if isinstance(image, (str, Path)) else image
        shrinking = max(gray.shape) > size
        small = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        batch.append(small.astype(np.float32)[:, :, None] / 255.0)
    graph_def = tf.compat.v1.GraphDef.FromString(Path(pb).read_bytes())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run("output:0", {"input:0": np.stack(batch)})


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _probs(rec: dict) -> np.ndarray:
    return np.array(list(rec["probabilities"].values()))


def _formats(folder: Path, source: str) -> dict[str, Path]:
    """One radiograph as 8-bit PNG, JPEG, DICOM MONOCHROME2 and DICOM MONOCHROME1 (stored inverted)."""
    gray = cv2.imread(source, cv2.IMREAD_GRAYSCALE)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"png": folder / "film.png", "jpeg": folder / "film.jpeg", "mono2": folder / "film_m2.dcm",
           "mono1": folder / "film_m1.dcm"}
    cv2.imwrite(str(out["png"]), gray)
    cv2.imwrite(str(out["jpeg"]), gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    out["mono2"].write_bytes(dicom_bytes(gray, photometric="MONOCHROME2", patient_id="P1"))
    out["mono1"].write_bytes(dicom_bytes(255 - gray, photometric="MONOCHROME1", patient_id="P2"))
    return out


def test_png_jpeg_dicom_match_the_evaluation_path(tiny, tmp_path):
    files = _formats(tmp_path / "in", tiny.test_files[0])
    np.testing.assert_allclose(load_dicom(files["mono1"]), load_dicom(files["mono2"]), atol=1e-6)
    paths = [str(p) for p in files.values()]
    out = tmp_path / "preds.jsonl"
    fp32 = runrecord.recorded_path(tiny.run_dir, "fp32_pb")
    summary = run_predict(tiny.run_dir, paths, model="fp32", output=out, quiet=True)
    assert (summary.predicted, summary.errors) == (4, 0)
    recs = _read_jsonl(out)
    assert [r["file"] for r in recs] == paths
    gray = cv2.imread(str(files["png"]), cv2.IMREAD_GRAYSCALE)  # the DICOM files hold these pixels too
    expected = _reference_probs(fp32, [gray, files["jpeg"], gray, gray], tiny.spec.image_size)
    for rec, want in zip(recs, expected):
        np.testing.assert_allclose(_probs(rec), want, atol=2e-6)
        assert list(rec["probabilities"]) == ["NORMAL", "PNEUMONIA"]
        assert rec["prediction"] == ["NORMAL", "PNEUMONIA"][int(np.argmax(want))]
    by_name = {Path(r["file"]).name: _probs(r) for r in recs}
    np.testing.assert_allclose(by_name["film_m1.dcm"], by_name["film_m2.dcm"], atol=2e-6)  # inversion undone
    np.testing.assert_allclose(by_name["film_m2.dcm"], by_name["film.png"], atol=2e-6)  # same pixels, same answer


def test_keras_and_frozen_fp32_agree_and_int8_matches_its_graph(tiny):
    info = read_run(tiny.run_dir)
    items = [ImageInput(Path(p)) for p in tiny.test_files]
    results = {}
    for model in ("keras", "fp32"):
        kind, path = model_location(info, model)
        predictor = Predictor(info, kind, path)
        results[model] = np.stack([_probs(r) for r in iter_predictions(predictor, items, batch_size=5, quiet=True)])
        predictor.close()
    np.testing.assert_allclose(results["keras"], results["fp32"], atol=1e-5)
    kind, int8 = model_location(info, "int8")
    predictor = Predictor(info, kind, int8)
    got = np.stack([_probs(r) for r in iter_predictions(predictor, items, batch_size=8, quiet=True)])
    predictor.close()
    np.testing.assert_allclose(got, _reference_probs(int8, tiny.test_files, tiny.spec.image_size), atol=2e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)


def test_ten_crop_averages_ten_crops_of_the_same_preprocessing(tiny, tmp_path):
    from medq.data.decode import load_pixels

    image = load_pixels(tiny.test_files[1])
    crops = ten_crops(image, tiny.spec)
    assert crops.shape == (10, 32, 32, 1)
    np.testing.assert_array_equal(crops[5], crops[0][:, ::-1])  # flips of the corner crops
    big = PreprocessSpec(round(32 * 256 / 224), 1, "unit")
    from medq.preprocess import preprocess

    np.testing.assert_array_equal(crops[4], preprocess(image, big)[2:34, 2:34])  # centre crop of the 37-px image
    out = tmp_path / "tc.jsonl"
    run_predict(tiny.run_dir, tiny.test_files[:3], ten_crop=True, output=out, quiet=True)
    graph = FrozenGraph(runrecord.recorded_path(tiny.run_dir, "fp32_pb"))
    for rec, path in zip(_read_jsonl(out), tiny.test_files[:3]):
        want = graph.predict(ten_crops(load_pixels(path), tiny.spec)).mean(axis=0)
        np.testing.assert_allclose(_probs(rec), want, atol=2e-6)
    graph.close()


def test_heatmaps_have_the_original_size_and_show_something(tiny, tmp_path):
    from medq.models import load_keras_model
    from medq.heatmap import GradCAM, find_cam_layer

    source = cv2.imread(tiny.test_files[2], cv2.IMREAD_GRAYSCALE)
    folder = tmp_path / "in" / "ward"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "wide.png"), cv2.resize(source, (70, 45)))  # not square, not 32 px
    cv2.imwrite(str(folder / "tall.jpeg"), cv2.resize(source, (40, 64)))
    heat = tmp_path / "heat"
    out = tmp_path / "p.jsonl"
    run_predict(tiny.run_dir, [tmp_path / "in"], heatmap_dir=heat, output=out, quiet=True)
    recs = {Path(r["file"]).name: r for r in _read_jsonl(out)}
    assert set(recs) == {"wide.png", "tall.jpeg"}
    for name, (h, w) in {"wide.png": (45, 70), "tall.jpeg": (64, 40)}.items():
        written = recs[name]["heatmaps"]
        assert set(written) == {"NORMAL", "PNEUMONIA"}
        for cls, png in written.items():
            assert Path(png).parent == heat / "ward" and Path(png).name == f"{Path(name).stem}_{cls}.png"
            overlay = cv2.imread(png, cv2.IMREAD_UNCHANGED)
            assert overlay.shape == (h, w, 3)
        coloured = [cv2.imread(p) for p in written.values()]
        assert any(np.ptp(img.astype(int)[:, :, 2] - img.astype(int)[:, :, 0]) > 20 for img in coloured)
    model = load_keras_model(runrecord.recorded_path(tiny.run_dir, "keras_model"))
    layer = model.get_layer(find_cam_layer(model))
    assert tuple(layer.output.shape[1:3]) == (16, 16) and "pool" not in type(layer).__name__.lower()
    cams = GradCAM(model).cams(load_batch(tiny.test_files[:6], tiny.spec), [0, 1])
    assert cams.shape == (6, 2, 16, 16) and cams.min() >= 0 and cams.max() <= 1
    assert all(cams[i].std(axis=(1, 2)).max() > 0.01 for i in range(6))  # every image: a map with structure


def test_folder_with_a_corrupt_file_reports_it_and_predicts_the_rest(tiny, tmp_path, capsys, clean_thread_env):
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(tiny.test_files[:3]):
        shutil.copy(src, (folder / "sub" if i else folder) / Path(src).name)
    good = Path(tiny.test_files[3]).read_bytes()
    (folder / "broken.jpeg").write_bytes(good[: len(good) // 2])  # truncated download
    (folder / "labels.csv").write_text("file,label\n")  # not an image: ignored, not an error
    (folder / "._junk.jpeg").write_bytes(b"\x00\x05\x16\x07")  # macOS debris: ignored
    code = main(["predict", "--run", str(tiny.run_dir), str(folder), "--quiet", "--batch-size", "2"])
    captured = capsys.readouterr()
    recs = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 0
    assert len(recs) == 4 and sum("error" in r for r in recs) == 1
    broken = next(r for r in recs if "error" in r)
    assert broken["file"].endswith("broken.jpeg") and "truncated JPEG" in broken["error"]
    last = captured.err.strip().splitlines()[-1]
    assert re.search(r"3 images predicted .*1 unreadable file skipped .*broken\.jpeg.*1 non-image file", last)
    assert os.environ["OMP_NUM_THREADS"]  # the runtime config's thread settings were applied

    out = tmp_path / "out" / "preds.jsonl"
    assert main(["predict", "--run", str(tiny.run_dir), str(folder), "-q", "-o", str(out)]) == 0
    assert _read_jsonl(out) == recs and not list(out.parent.glob(".*tmp*"))
    assert capsys.readouterr().out == ""


def test_bad_run_or_missing_model_is_one_line(tiny, tmp_path, capsys, clean_thread_env):
    image = tiny.test_files[0]
    partial = tmp_path / "partial"
    partial.mkdir()
    manifest = runrecord.read_manifest(tiny.run_dir).to_dict()
    manifest["artifacts"] = {k: v for k, v in manifest["artifacts"].items() if k != "int8_pb"}
    (partial / "manifest.json").write_text(json.dumps(manifest))
    graph_only = tmp_path / "graph_only"  # e.g. a converted run: a frozen graph, no Keras model
    graph_only.mkdir()
    shutil.copy(runrecord.recorded_path(tiny.run_dir, "fp32_pb"), graph_only / "model_fp32.pb")
    manifest["artifacts"] = {"fp32_pb": runrecord.read_manifest(tiny.run_dir)["artifacts"]["fp32_pb"] | {"inputs": {}}}
    (graph_only / "manifest.json").write_text(json.dumps(manifest))
    cases = {
        ("--run", str(tmp_path / "nope")): "no such run folder",
        ("--run", str(tmp_path)): "not a medq run (no manifest.json)",
        ("--run", str(partial), "--model", "int8"): "this run has no INT8 model (model_int8.pb); run `medq quantize`",
        ("--run", str(partial), "--model", "fp32"): "recorded in the run's manifest but missing",
        ("--run", str(tiny.run_dir), "--model-file", str(tmp_path / "x.pb")): "model file not found",
        ("--run", str(graph_only), "--heatmap", str(tmp_path / "h")): "--heatmap needs the run's Keras model",
    }
    for args, message in cases.items():
        assert main(["predict", *args, image]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
    assert main(["predict", "--run", str(tiny.run_dir), str(tmp_path / "empty")]) == 1  # nothing readable
    assert '"error": "file not found"' in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--run", str(tiny.run_dir), str(tmp_path / "empty")]) == 2
    assert "no PNG, JPEG or DICOM files found" in capsys.readouterr().err


def test_collect_inputs_and_multilabel_records(tmp_path):
    (tmp_path / "a" / "__MACOSX").mkdir(parents=True)
    (tmp_path / "a" / "__MACOSX" / "x.png").write_bytes(b"junk")
    (tmp_path / "a" / "b.PNG").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "IM0001").write_bytes(dicom_bytes(np.zeros((4, 4), np.uint8)))  # DICOM without a suffix
    (tmp_path / "a" / "IM0002").write_text("not dicom")
    items, ignored = collect_inputs([tmp_path / "a", tmp_path / "given.txt"])
    assert [i.path.name for i in items] == ["IM0001", "b.PNG", "given.txt"]
    assert ignored == 2 and items[0].root == tmp_path / "a" and items[2].root is None
    info = RunInfo(tmp_path, ["Atelectasis", "Effusion", "Mass"], "multilabel", PreprocessSpec(8, 1, "unit"))
    rec = record(Path("f.png"), np.array([0.7, 0.2, 0.5]), info)
    assert rec["findings"] == rec["prediction"] == ["Atelectasis", "Mass"]
    assert record(Path("f.png"), np.array([0.7, 0.2, 0.5]), info, threshold=0.6)["findings"] == ["Atelectasis"]


def _deploy_snippet(document: str = "docs/deploy.md") -> str:
    text = (REPO / document).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"{document} should hold exactly one python block (the deploy snippet)"
    return blocks[0]


def test_readme_deploy_snippet_runs_as_written(tiny, tmp_path):
    """The README's snippet, run from a folder laid out like the repo (output/default, data/chest_xray)."""
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "default").symlink_to(tiny.run_dir)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chest_xray").symlink_to(tiny.data)
    done = subprocess.run([sys.executable, "-c", _deploy_snippet("README.md")], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    images = sorted(f"data/chest_xray/{p.relative_to(tiny.data)}" for p in (tiny.data / "test").glob("*/*.jpeg"))[:4]
    assert [line.split(" ", 1)[0] for line in lines] == images
    expected = _frozen_probs(runrecord.recorded_path(tiny.run_dir, "int8_pb"), [str(tmp_path / i) for i in images],
                             tiny.spec)
    for line, want in zip(lines, expected):
        got = json.loads(line.split(" ", 1)[1].replace("'", '"'))
        np.testing.assert_allclose(list(got.values()), want, atol=1e-3)


def test_deploy_snippet_runs_with_plain_tensorflow_and_matches_medq(tiny, tmp_path):
    code = _deploy_snippet()
    assert not re.search(r"^\s*(import|from)\s+medq", code, flags=re.M)
    script = tmp_path / "predict_int8.py"
    script.write_text(code)
    files = _formats(tmp_path / "in", tiny.test_files[4])
    rgba = tmp_path / "in" / "film_rgba.png"  # a 4-channel PNG exercises the alpha/BGR branch
    gray = cv2.imread(str(files["png"]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(rgba), cv2.merge([gray, gray, gray, np.full_like(gray, 255)]))
    paths = [str(files["png"]), str(files["jpeg"]), str(rgba), tiny.test_files[5]]
    # medq cannot be imported in the child: the snippet must stand alone
    guard = "import sys; sys.modules['medq'] = None; sys.argv = sys.argv[1:]; exec(open(sys.argv[0]).read())"
    done = subprocess.run([sys.executable, "-c", guard, str(script), str(tiny.run_dir), *paths],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = [json.loads(line) for line in done.stdout.splitlines()]
    expected = _frozen_probs(runrecord.recorded_path(tiny.run_dir, "int8_pb"), paths, tiny.spec)
    assert [r["file"] for r in recs] == paths
    for rec, want in zip(recs, expected):
        np.testing.assert_allclose(_probs(rec), want, atol=2e-6)
        assert rec["prediction"] == ["NORMAL", "PNEUMONIA"][int(np.argmax(want))]


def test_a_file_that_breaks_the_decoder_is_one_error_record_not_a_lost_run(tmp_path, monkeypatch):
    import medq.predict as predict

    info = RunInfo(tmp_path, ["NORMAL", "PNEUMONIA"], "binary", PreprocessSpec(8, 1, "unit"))
    files = []
    for name in ("a.png", "odd.png", "c.png"):
        files.append(tmp_path / name)
        cv2.imwrite(str(files[-1]), np.full((12, 12), 128, np.uint8))
    real = predict.decode_pixels

    def decoder(path, **settings):
        if Path(path).name == "odd.png":
            raise cv2.error("OpenCV(4.11) resize.cpp:4152: error: (-215:Assertion failed) !ssize.empty()")
        return real(path, **settings)

    monkeypatch.setattr(predict, "decode_pixels", decoder)

    class Fixed:
        def __init__(self):
            self.info = info

        def __call__(self, x, batch_size=32):
            return np.tile([0.3, 0.7], (len(x), 1))

    records = list(iter_predictions(Fixed(), [ImageInput(f) for f in files], batch_size=8, quiet=True))
    assert [r["file"] for r in records] == [str(f) for f in files]
    assert records[0]["prediction"] == records[2]["prediction"] == "PNEUMONIA"
    assert "error" in records[1] and "cannot be read (error:" in records[1]["error"] and "\n" not in records[1]["error"]


def test_predict_gives_the_benchmark_stage_probabilities_for_the_same_images(tiny, tmp_path):
    """The benchmark's FP32 and INT8 rows stored their probabilities for the test split: `medq predict` on those
    files (decoded and preprocessed on its own path) must give the same numbers."""
    from dataclasses import replace

    from medq.benchmark import run_benchmark
    from medq.data.readers import read_dataset
    from medq.predict import run_predict

    config = replace(tiny.config, benchmark=replace(
        tiny.config.benchmark, precisions=["fp32", "int8"], reference=[], instances=[], batch_sizes=[8],
        batch_size=8, warmup=1, latency_iterations=3, throughput_iterations=2))
    run_benchmark(config)
    files = read_dataset(config.data, seed=config.run.seed).paths("test")
    for model in ("fp32", "int8"):
        out = tmp_path / f"{model}.jsonl"
        run_predict(tiny.run_dir, files, model=model, output=out, quiet=True)
        got = np.stack([_probs(r) for r in _read_jsonl(out)])
        stored = np.load(tiny.run_dir / "benchmark" / "probs" / f"tensorflow-{model}.npy")
        np.testing.assert_allclose(got, stored, atol=2e-6)


def test_a_record_decides_at_the_runs_own_thresholds_unless_one_is_given(tmp_path):
    from medq.thresholds import Thresholds

    spec = PreprocessSpec(8, 1, "unit")
    binary = RunInfo(tmp_path, ["NORMAL", "PNEUMONIA"], "binary", spec,
                     thresholds=Thresholds("binary", ["NORMAL", "PNEUMONIA"], {"PNEUMONIA": 0.3}, "validation"))
    # 0.4 ≥ the run's 0.3: PNEUMONIA, although NORMAL's 0.6 is the arg-max (what 0.5 decides)
    rec = record(Path("f.png"), np.array([0.6, 0.4]), binary)
    assert rec["prediction"] == "PNEUMONIA" and rec["thresholds"] == {"PNEUMONIA": 0.3}
    assert record(None, np.array([0.6, 0.4]), binary, threshold=None)["prediction"] == "PNEUMONIA"
    overridden = record(None, np.array([0.6, 0.4]), binary, threshold=0.5)
    assert overridden["prediction"] == "NORMAL" and overridden["thresholds"] == {"PNEUMONIA": 0.5}
    classes = ["benign", "malignant", "normal"]
    multiclass = RunInfo(tmp_path, classes, "multiclass", spec, thresholds=Thresholds(
        "multiclass", classes, {"benign": 0.4, "malignant": 0.2, "normal": 0.4}, "validation"))
    # by hand: p − t = (0.0, 0.15, −0.15) → malignant, where the arg-max of p is benign
    assert record(None, np.array([0.4, 0.35, 0.25]), multiclass)["prediction"] == "malignant"
    # a run without recorded thresholds decides at 0.5 (RunInfo's default: no thresholds)
    bare = RunInfo(tmp_path, ["NORMAL", "PNEUMONIA"], "binary", spec)
    assert record(None, np.array([0.6, 0.4]), bare)["thresholds"] == {"PNEUMONIA": 0.5}


def test_a_records_prediction_agrees_with_the_probabilities_it_shows(tmp_path):
    from medq.thresholds import Thresholds

    classes = ["NORMAL", "PNEUMONIA"]
    info = RunInfo(tmp_path, classes, "binary", PreprocessSpec(8, 1, "unit"),
                   thresholds=Thresholds("binary", classes, {"PNEUMONIA": 0.2999998}, "validation"))
    # 0.2999996 < 0.2999998: the line shows it with the digits that keep it below (6 decimals showed 0.3 and called
    # PNEUMONIA, unlike evaluate), so the line, an SR built from it and the model's own output all agree
    rec = record(None, np.array([0.7000004, 0.2999996]), info)
    assert rec["probabilities"]["PNEUMONIA"] == 0.2999996 and rec["prediction"] == "NORMAL"


def test_a_folder_of_odd_inputs_each_bad_one_listed_with_its_reason_each_real_file_once(tiny, tmp_path, capsys,
                                                                                          clean_thread_env):
    """Inputs nobody tried: links to nowhere and to themselves, a folder link that loops, an empty and a text file
    named .png, a named pipe and /dev/zero, a full-range 16-bit PNG, a non-ASCII name, a thumbnail smaller than the model's input (predicted,
    with a warning), and one file given again (another spelling, a link, the
    folder holding it). Every bad file is a line with its reason, every real file is predicted once, exit 0."""
    import errno

    from medq.data.decode import BROKEN_LINK, NOT_REGULAR

    folder = tmp_path / "odd"
    (folder / "sub").mkdir(parents=True)
    good = folder / "good.jpeg"
    shutil.copy(tiny.test_files[0], good)
    gray = cv2.imread(tiny.test_files[1], cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "sixteen.png"), gray.astype(np.uint16) * 257)  # every 16 bits used: v*257/65535 = v/255
    shutil.copy(tiny.test_files[2], folder / "lung ünïcödé 肺.jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "self.png").symlink_to(folder / "self.png")  # ELOOP when followed
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # a folder loop: entered once
    (folder / "zz_alias.jpeg").symlink_to(good)
    cv2.imwrite(str(folder / "thumb.png"), gray[:20, :40])  # 40 wide, 20 high: below the model's 32-pixel side
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # reading it would wait for a writer forever

    code = main(["predict", "--run", str(tiny.run_dir), str(folder), str(good), str(folder / "sub" / ".." / "good.jpeg"),
                 str(pipe), "/dev/zero", "--quiet"])
    captured = capsys.readouterr()
    recs = {Path(r["file"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert code == 0 and len(captured.out.splitlines()) == len(recs) == 10  # good.jpeg and its alias: one line
    assert recs["pipe.png"]["error"] == recs["zero"]["error"] == NOT_REGULAR
    assert recs["dangling.png"]["error"] == BROKEN_LINK and recs["empty.png"]["error"] == "empty file (0 bytes)"
    assert os.strerror(errno.ELOOP) in recs["self.png"]["error"] and "not a PNG" in recs["notes.png"]["error"]
    assert "zz_alias.jpeg" not in recs and "lung ünïcödé 肺.jpeg" in recs
    reference = _reference_probs(tiny.run_dir / "model_fp32.pb",
                                 [good, gray, tiny.test_files[2]], tiny.spec.image_size)
    for name, expected in zip(("good.jpeg", "sixteen.png", "lung ünïcödé 肺.jpeg"), reference):
        np.testing.assert_allclose(_probs(recs[name]), expected, atol=1e-4)
    assert recs["thumb.png"]["warning"].startswith("a 40×20-pixel image, smaller than the model's 32×32 input")
    assert not any("warning" in recs[name] for name in ("good.jpeg", "sixteen.png"))  # 48 px: no warning
    last = captured.err.strip().splitlines()[-1]
    assert re.search(r"4 images predicted .*6 unreadable files skipped .*1 with a warning .*thumb\.png.*; 3 inputs "
                     "naming a file already given", last)

    only_bad = main(["predict", "--run", str(tiny.run_dir), str(folder / "empty.png"), "--quiet"])
    assert only_bad == 1 and "error" in json.loads(capsys.readouterr().out)  # nothing predicted: exit 1


@pytest.mark.parametrize("option", ["-o", "--heatmap", "--dicom-sr"])
def test_an_output_under_a_file_is_refused_before_any_image_is_read(tiny, tmp_path, capsys, option):
    blocker = tmp_path / "report.txt"
    blocker.write_text("a file, not a folder\n")
    code = main(["predict", "--run", str(tiny.run_dir), tiny.test_files[0], option, str(blocker / "out" / "x"), "-q"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and blocker.read_text() == "a file, not a folder\n"
    assert f"{blocker}: is a file, so {option} " in captured.err and len(captured.err.strip().splitlines()) == 1


def test_a_named_pipe_inside_a_folder_is_counted_and_listed_as_unreadable(tiny, tmp_path, capsys, clean_thread_env):
    """A pipe found in a folder argument is a line with its reason and counted in the summary, not dropped unseen; a
    link to it is the same file (a repeat), and for the dataset readers not a broken link (its target exists)."""
    from medq.data.common import Intake
    from medq.data.decode import NOT_REGULAR

    folder = tmp_path / "with_pipe"
    folder.mkdir()
    shutil.copy(tiny.test_files[0], folder / "good.jpeg")
    os.mkfifo(folder / "queue.png")
    (folder / "to_queue.png").symlink_to(folder / "queue.png")

    code = main(["predict", "--run", str(tiny.run_dir), str(folder), "--quiet"])
    captured = capsys.readouterr()
    recs = {Path(r["file"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert code == 0 and set(recs) == {"good.jpeg", "queue.png"}
    assert recs["queue.png"] == {"file": str(folder / "queue.png"), "error": NOT_REGULAR}
    assert re.search(r"1 image predicted .*; 1 unreadable file skipped \(first: .*queue\.png: not a regular file.*; "
                     r"1 input naming a file already given", captured.err)

    intake = Intake()  # the dataset readers list it too, with the same reason
    assert intake.files(folder) == [folder / "good.jpeg"]
    assert sorted(intake.skipped) == [(str(folder / "queue.png"), NOT_REGULAR), (str(folder / "to_queue.png"),
                                                                                 NOT_REGULAR)]


def test_a_file_name_that_is_not_utf8_is_written_as_valid_utf8_json(tiny, tmp_path, capsys, clean_thread_env):
    """A Latin-1 name (café.png written as b'caf\\xe9.png') used to reach the line as a lone surrogate escape,
    "\\udce9", which strict JSON parsers reject; its byte now shows as the text \\xe9. UTF-8 names stay as they are."""
    folder = tmp_path / "names"
    folder.mkdir()
    latin = folder / os.fsdecode(b"caf\xe9.png")
    cv2.imwrite(str(folder / "plain.png"), cv2.imread(tiny.test_files[0], cv2.IMREAD_GRAYSCALE))
    shutil.copy(folder / "plain.png", latin)
    os.mkfifo(folder / os.fsdecode(b"queue\xff.png"))  # an error line carries the name too
    shutil.copy(folder / "plain.png", folder / "lung ü.png")
    out = tmp_path / "out.jsonl"

    assert main(["predict", "--run", str(tiny.run_dir), str(folder), "-o", str(out), "--quiet"]) == 0
    lines = out.read_bytes().splitlines()
    recs = {}
    for line in lines:
        rec = json.loads(line.decode("utf-8"))  # strict UTF-8
        for text in (rec["file"], *rec.get("probabilities", {})):
            text.encode("utf-8")  # no lone surrogate: raises UnicodeEncodeError otherwise
        recs[rec["file"]] = rec
    assert set(recs) == {f"{folder}/caf\\xe9.png", f"{folder}/queue\\xff.png", f"{folder}/lung ü.png",
                         f"{folder}/plain.png"}
    assert "not a regular file" in recs[f"{folder}/queue\\xff.png"]["error"]
    for name in ("caf\\xe9.png", "lung ü.png"):
        assert recs[f"{folder}/{name}"]["probabilities"] == recs[f"{folder}/plain.png"]["probabilities"]
