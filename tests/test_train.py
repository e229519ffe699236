"""Training: resume after an interruption, logs, 10-crop evaluation, augmentation, tf.distribute wiring."""
import csv
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from medq.data import pinned
from medq import artifacts, runrecord
from medq.config import load_config
from medq.data.readers import read_dataset
from medq.errors import MedqError
from medq.preprocess import PreprocessSpec, preprocess

TINY = "model.params={blocks: 2, filters: 4, dense_units: 8}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from medq.data.phantoms import generate_chest_pneumonia

    root = tmp_path_factory.mktemp("data") / "chest_xray"
    generate_chest_pneumonia(root, 48, 4, 12, 40, 7)
    return root


def _config(tmp_path, data_root, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", f"data.root={data_root}", "preprocess.image_size=32",
                              "train.batch_size=16", "train.tensorboard=false", TINY, *overrides])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_root):
    """A 4-epoch training interrupted after epoch 2, then resumed: (config, first-call state, FitResult)."""
    import tensorflow as tf

    import medq.fitting as fitting
    import medq.train as train

    config = _config(tmp_path_factory.mktemp("runs"), data_root, "train.epochs=4", "train.tensorboard=true")

    class Interrupt(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    original = train.fit_model

    def interrupted_fit(*args, **kwargs):
        return original(*args, **kwargs, extra_callbacks=[Interrupt()])

    train.fit_model = interrupted_fit
    try:
        with pytest.raises(KeyboardInterrupt):
            train.run_train(config)
    finally:
        train.fit_model = original
    state = json.loads((config.run_dir / "checkpoints" / fitting.LAST_STATE).read_text())
    reader = tf.train.load_checkpoint(str(config.run_dir / "checkpoints" / state["checkpoint"]))
    state["optimizer_iterations"] = int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    return config, state, train.run_train(config, resume=True)


def test_resume_continues_from_the_last_epoch(resumed):
    config, state, result = resumed
    assert state["epoch"] == 2 and not state["finished"]
    assert result.epochs_run == 2  # epochs 3 and 4 only
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert all("val_objective" in row and "val_auc" in row for row in result.history)
    # the optimizer state came back too: its step count continues from the interrupted one
    steps = len(read_dataset(config.data, seed=config.run.seed).splits["train"]) // 16
    assert state["optimizer_iterations"] >= 2 * steps
    assert int(result.model.optimizer.iterations.numpy()) >= state["optimizer_iterations"] + 2 * steps
    manifest = runrecord.read_manifest(config.run_dir)
    entry = manifest["stages"]["train"]
    assert entry["resumed"] is True and entry["epochs_run"] == 2 and entry["flops"] > 0
    assert manifest["model_source"] == "train" and manifest["selected_val_metrics"] == result.val_metrics
    assert manifest["artifacts"]["keras_model"]["sha256"] == artifacts.sha256(config.run_dir / "model.keras")
    with open(config.run_dir / "logs" / "train.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1, 2, 3]  # CSVLogger counts from 0, appended
    assert any((config.run_dir / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((config.run_dir / "checkpoints" / "last_epoch.json").read_text())["finished"] is True


def test_resume_refuses_a_checkpoint_from_another_config(resumed):
    import medq.train as train

    config, _, _ = resumed
    other = load_config(None, [f"run.output_dir={config.run.output_dir}", f"data.root={config.data.root}",
                               "preprocess.image_size=32", "train.epochs=4", "train.learning_rate=0.01", TINY])
    with pytest.raises(MedqError, match="different model, data, split or training config"):
        train.run_train(other, resume=True)


def test_ten_crops_are_corners_centre_and_mirrors():
    from medq.tta import crops_of as ten_crops, ten_crop_size

    assert ten_crop_size(224) == 256 and ten_crop_size(96) == 110 and ten_crop_size(32) == 37
    image = np.arange(6 * 6, dtype=np.float32).reshape(6, 6, 1)
    crops = ten_crops(image, 4)
    assert crops.shape == (10, 4, 4, 1)
    np.testing.assert_array_equal(crops[0], image[:4, :4])
    np.testing.assert_array_equal(crops[3], image[2:, 2:])
    np.testing.assert_array_equal(crops[4], image[1:5, 1:5])
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


def test_evaluate_keras_reports_single_and_ten_crop_side_by_side(resumed, tmp_path):
    from medq.data.decode import load_image
    from medq.models import load_keras_model
    from medq.train import evaluate_keras, run_evaluate
    from medq.tta import crops_of as ten_crops

    config, _, _ = resumed
    index = read_dataset(config.data, seed=config.run.seed)
    spec = PreprocessSpec.from_config(config)
    model = load_keras_model(config.run_dir / "model.keras")
    paths, labels = index.paths("test"), index.labels("test")
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not an image")
    out = evaluate_keras(model, paths + [str(broken)], np.vstack([labels, labels[:1]]), spec, ten_crop=True)
    assert out["n_skipped"] == 1
    # the oracle: Keras' own predictions on the same preprocessing, scored by sklearn
    from sklearn.metrics import accuracy_score, confusion_matrix

    truth = labels.argmax(axis=1)
    single = model.predict(np.stack([preprocess(load_image(p), spec) for p in paths]), verbose=0)
    ten = np.stack([model.predict(ten_crops(preprocess(load_image(p), PreprocessSpec(37, 1, "unit")), 32),
                                  verbose=0).mean(axis=0) for p in paths])
    for view, probs in (("single_crop", single), ("ten_crop", ten)):
        assert out[view]["n_images"] == len(paths)
        assert out[view]["accuracy"] == pytest.approx(accuracy_score(truth, probs.argmax(axis=1)), abs=1e-9)
        assert out[view]["confusion_matrix"] == confusion_matrix(truth, probs.argmax(axis=1), labels=[0, 1]).tolist()
    # the 10-crop probability of one image is the mean over crops of the same preprocess at round(32·256/224) = 37
    big = preprocess(load_image(paths[0]), PreprocessSpec(37, 1, "unit"))
    manual = model.predict(ten_crops(big, 32), verbose=0).mean(axis=0)
    single_only = evaluate_keras(model, paths[:1], labels[:1], spec, ten_crop=False)
    assert single_only["ten_crop"] is None
    one = evaluate_keras(model, paths[:1], labels[:1], spec, ten_crop=True, task="binary", classes=index.classes)
    assert one["ten_crop"]["accuracy"] == float(np.argmax(manual) == np.argmax(labels[0]))
    report = run_evaluate(config, ten_crop=True, index=index)
    assert report["ten_crop"]["n_images"] == report["single_crop"]["n_images"] == len(paths)
    entry = runrecord.read_manifest(config.run_dir)["stages"]["evaluate"]
    assert entry["ten_crop"] is True and "accuracy" in entry["ten_crop_metrics"]
    # a threshold of 0 calls every image positive: sensitivity 1, specificity 0
    everyone = run_evaluate(config, index=index, threshold=0.0)["single_crop"]
    assert (everyone["sensitivity"], everyone["specificity"], everyone["threshold"]) == (1.0, 0.0, 0.0)


def test_augmentation_never_flips_unless_allowed():
    import tensorflow as tf

    from medq.config import AugmentConfig
    from medq.tfdata import build_augmenter

    spec = PreprocessSpec(32, 1, "unit")
    names = [layer.__class__.__name__ for layer in build_augmenter(AugmentConfig(), spec).layers]
    assert "RandomFlip" not in names and {"RandomRotation", "RandomZoom", "RandomIntensity"} <= set(names)
    assert "RandomFlip" in [layer.__class__.__name__
                            for layer in build_augmenter(AugmentConfig(horizontal_flip=True), spec).layers]
    x = tf.random.uniform((2, 32, 32, 1), seed=1)
    augmenter = build_augmenter(AugmentConfig(), spec)
    assert not np.allclose(augmenter(x, training=True).numpy(), x.numpy())
    np.testing.assert_array_equal(augmenter(x, training=False).numpy(), x.numpy())


def test_intensity_augmentation_keeps_normalised_units():
    """imagenet/symmetric inputs are mostly negative: augmentation must not clip them (keras' RandomContrast
    clips to [0, 255]), and contrast/brightness must stay within the configured range."""
    import tensorflow as tf

    from medq.config import AugmentConfig
    from medq.tfdata import build_augmenter

    spec = PreprocessSpec(32, 3, "imagenet")
    x = tf.random.uniform((8, 32, 32, 3), -2.0, 2.0, seed=3)
    only_intensity = AugmentConfig(rotation_deg=0, shift=0, zoom=0, contrast=0.2, brightness=0.1)
    y = build_augmenter(only_intensity, spec, seed=5)(x, training=True).numpy()
    assert y.min() < -1.0  # negative pixels survive
    mean = x.numpy().mean(axis=(1, 2), keepdims=True)
    centred_in, centred_out = x.numpy() - mean, y - y.mean(axis=(1, 2), keepdims=True)
    factor = (centred_out * centred_in).sum(axis=(1, 2, 3)) / (centred_in ** 2).sum(axis=(1, 2, 3))
    assert np.all((factor >= 0.8 - 1e-4) & (factor <= 1.2 + 1e-4)) and np.ptp(factor) > 0.01
    offset = (y - (mean + factor[:, None, None, None] * centred_in)).mean(axis=(1, 2, 3))
    assert np.all(np.abs(offset) <= 0.1 / 0.226 + 1e-4)


def test_low_res_phase_starts_the_full_resolution_training(tmp_path, data_root, monkeypatch):
    import medq.fitting as fitting
    import medq.train as train

    config = _config(tmp_path, data_root, "train.epochs=1", "train.low_res.image_size=16", "train.low_res.epochs=2")
    starts = []
    copy = fitting._copy_weights
    monkeypatch.setattr(fitting, "_copy_weights", lambda source, model: (starts.append(source), copy(source, model)))
    result = train.run_train(config)
    low = config.run_dir / train.LOW_RES_MODEL
    assert starts == [low]
    from medq.models import load_keras_model

    assert load_keras_model(low).input_shape[1:] == (16, 16, 1) and result.model.input_shape[1:] == (32, 32, 1)
    entry = runrecord.read_manifest(config.run_dir)["stages"]["train"]["low_res"]
    assert entry["image_size"] == 16 and entry["epochs"] == 2 and 1 <= entry["best_epoch"] <= 2
    with pytest.raises(MedqError, match="train.low_res: set both image_size and epochs"):
        _config(tmp_path, data_root, "train.low_res.epochs=2")


def test_a_model_whose_weights_depend_on_the_input_size_cannot_change_resolution(tmp_path):
    import tensorflow as tf

    from medq.fitting import _copy_weights

    def flat(size):
        return tf.keras.Sequential([tf.keras.Input((size, size, 1)), tf.keras.layers.Flatten(),
                                    tf.keras.layers.Dense(2)])

    flat(8).save(tmp_path / "small.keras")
    with pytest.raises(MedqError, match="small.keras: its weights do not fit"):
        _copy_weights(tmp_path / "small.keras", flat(16))


def test_selection_rule_and_class_weights():
    from medq.fitting import class_weights
    from medq.selection import is_better

    assert is_better({"accuracy": 0.8, "auc": 0.7}, {"accuracy": 0.7, "auc": 0.9}, "accuracy")
    assert is_better({"accuracy": 0.8, "auc": 0.9}, {"accuracy": 0.8, "auc": 0.7}, "accuracy")  # tie → AUC
    assert not is_better({"accuracy": 0.8, "auc": 0.7}, {"accuracy": 0.8, "auc": 0.7}, "accuracy")
    assert is_better({"accuracy": 0.5, "auc": float("nan")}, None, "auc")
    # run.objective: auc (the default) picks by AUC, ties by accuracy
    assert is_better({"accuracy": 0.7, "auc": 0.9}, {"accuracy": 0.8, "auc": 0.7}, "auc")
    assert is_better({"accuracy": 0.8, "auc": 0.9}, {"accuracy": 0.7, "auc": 0.9}, "auc")
    assert not is_better({"accuracy": 0.9, "auc": 0.6}, {"accuracy": 0.7, "auc": 0.9}, "auc")
    # the chance-level guard: an AUC whose interval reaches 0.5 never replaces a model, whatever the objective
    chance = {"accuracy": 0.95, "auc": 0.6, "ci": {"auc": [0.45, 0.75]}}
    learned = {"accuracy": 0.6, "auc": 0.58, "ci": {"auc": [0.52, 0.64]}}
    assert not is_better(chance, learned, "auc") and not is_better(chance, learned, "accuracy")
    assert is_better(learned, chance, "accuracy") and is_better(chance, None, "auc")
    weights = class_weights(np.array([[1, 0], [0, 1], [0, 1], [0, 1]], np.float32), "binary", "balanced")
    assert weights == {0: 2.0, 1: pytest.approx(2 / 3)}


@pytest.mark.parametrize("strategy", ["mirrored", "multi-worker"])
def test_fit_under_a_distribution_strategy(strategy, tmp_path, data_root, monkeypatch):
    """The strategy wiring on one machine: the model is built and trained one epoch inside the strategy's scope."""
    from medq.fitting import fit_model, is_chief, make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = _config(tmp_path, data_root, "train.epochs=1", "train.batch_size=64", f"train.distribute={strategy}")
    index = read_dataset(config.data, seed=config.run.seed)
    result = fit_model(config, index)
    expected = {"mirrored": "MirroredStrategy", "multi-worker": "CollectiveAllReduceStrategy"}[strategy]
    assert type(result.model.distribute_strategy).__name__ == expected
    assert result.epochs_run == 1
    # the validation accuracy it reports is the trained model's on the validation split (sklearn as the oracle)
    from sklearn.metrics import accuracy_score

    from medq.data.decode import load_image

    spec = PreprocessSpec.from_config(config)
    probs = result.model.predict(np.stack([preprocess(load_image(p), spec) for p in index.paths("val")]), verbose=0)
    truth = index.labels("val").argmax(axis=1)
    assert result.val_metrics["accuracy"] == pytest.approx(accuracy_score(truth, probs.argmax(axis=1)), abs=1e-9)
    assert is_chief(make_strategy(strategy))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_worker_training_on_loopback(tmp_path, data_root):
    """MultiWorkerMirroredStrategy across two processes (TF_CONFIG, 127.0.0.1): both train, only the chief writes."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    args = [sys.executable, "-m", "medq", "train", "--set", f"run.output_dir={tmp_path}", "--set",
            f"data.root={data_root}", "--set", "preprocess.image_size=32", "--set", "train.epochs=2", "--set",
            "train.distribute=multi-worker", "--set", TINY]
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   TF_CPP_MIN_LOG_LEVEL="2")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    manifest = runrecord.read_manifest(tmp_path / "default")
    assert manifest["stages"]["train"]["epochs_run"] == 2 and manifest["model_source"] == "train"
    # each worker read its own half of the training images (tests/test_cache.py: the halves are disjoint)
    n_train = manifest["stages"]["train"]["split_sizes"]["train"]
    for i, out in enumerate(outputs):
        assert re.search(rf"worker {i} of 2: \d+ of the {n_train} training images per epoch", out), out


def test_multilabel_metrics_have_a_confusion_matrix_per_label():
    from medq.metrics import task_metrics

    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    p = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.4], [0.1, 0.7]])
    m = task_metrics("multilabel", y, p, ["a", "b"], threshold=0.5)
    assert m["confusion_matrix"] == {"a": [[2, 0], [0, 2]], "b": [[1, 1], [1, 1]]}
    assert m["sensitivity"] == {"a": 1.0, "b": 0.5} and m["specificity"] == {"a": 1.0, "b": 0.5}
    assert m["auc"] == pytest.approx(np.mean([1.0, 0.75]))


def test_multiclass_metrics_have_one_vs_rest_sensitivity_and_specificity():
    from medq.metrics import task_metrics

    # truth a, a, b, c, c; predicted a, b, b, c, a
    y = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 2]]
    p = np.eye(3)[[0, 1, 1, 2, 0]] * 0.8 + 0.1
    m = task_metrics("multiclass", y, p, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m["sensitivity"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    # a: of the 3 non-a images, 1 (a c) was called a → 2/3; b: 1 of 4 called b; c: none of 3 called c
    assert m["specificity"] == pytest.approx({"a": 2 / 3, "b": 3 / 4, "c": 1.0})


def test_an_interrupted_retrain_leaves_the_previous_model_and_manifest_as_they_were(tmp_path, data_root,
                                                                                     monkeypatch):
    import tensorflow as tf

    import medq.train as train

    config = _config(tmp_path, data_root, "train.epochs=2")
    train.run_train(config)
    kept = {name: (config.run_dir / name).read_bytes() for name in ("model.keras", "manifest.json")}

    class Killed(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt  # after the first (improving) epoch of the rerun was validated

    original = train.fit_model
    monkeypatch.setattr(train, "fit_model", lambda *a, **k: original(*a, **k, extra_callbacks=[Killed()]))
    with pytest.raises(KeyboardInterrupt):
        train.run_train(config)
    assert {name: (config.run_dir / name).read_bytes() for name in kept} == kept
    assert runrecord.verified_path(config.run_dir, "keras_model") == config.run_dir / "model.keras"
    assert not (config.run_dir / ".staging").exists()


def test_nan_validation_outputs_stop_training_with_one_line(tmp_path, data_root):
    import medq.fitting as train

    config = _config(tmp_path, data_root, "train.epochs=1", "train.learning_rate=9.0", "train.optimizer=sgd",
                     "train.loss=cce")
    index = pinned.run_index(config, stage="train")
    original = train.predict_dataset
    try:
        train.predict_dataset = lambda model, ds: (lambda y, p: (y, p * np.nan))(*original(model, ds))
        with pytest.raises(train.TrainingDiverged, match="validation outputs are NaN or infinite"):
            train.fit_model(config, index)
    finally:
        train.predict_dataset = original
