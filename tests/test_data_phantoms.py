"""The built-in phantoms: every kind written in its real layout, read back by its reader, deterministic — and
learnable: a tiny CNN trained for a few seconds separates the classes on held-out phantoms."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from medq.config import DataConfig
from medq.data.decode import load_image
from medq.data.nih import CHEXNET_CLASSES
from medq.data.phantoms import PHANTOM_FORMATS, chest_anatomy, draw_chest, generate_phantoms
from medq.data.phantoms_nih import LABELS
from medq.data.readers import read_dataset
from medq.data.rsna import RSNA_CLASSES

FOLDERS = {"chest-pneumonia": "chest_xray", "chest-multilabel": "ChestXray-NIHCC", "rsna-dicom": "rsna",
           "busi": "Dataset_BUSI_with_GT"}


def generate(tmp_path: Path, kind: str, n_train: int, n_val: int, n_test: int, size: int = 40, seed: int = 5):
    root = tmp_path / FOLDERS[kind]
    return root, generate_phantoms(kind, root, n_train, n_val, n_test, size, seed)


def read(root: Path, **kw):
    seed = kw.pop("seed", 1)
    return read_dataset(DataConfig(root=str(root), **kw), seed=seed)


def everything(index) -> list:
    return [s for samples in index.splits.values() for s in samples]


def totals(index) -> dict[str, int]:
    return {c: sum(index.counts(s)[c] for s in index.splits) for c in index.classes}


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_each_kind_is_detected_and_read_back_exactly(tmp_path, kind):
    root, result = generate(tmp_path, kind, 30, 8, 14)
    index = read(root)
    assert index.format == result["format"] == PHANTOM_FORMATS[kind]
    assert index.notes[0].startswith(f"detected format: {PHANTOM_FORMATS[kind]}")
    assert not index.skipped
    assert all(n == 0 for n in index.patient_overlap().values())
    counts = result["counts"]
    if kind == "chest-pneumonia":  # Kaggle: the generated val/ (8) is unused, validation is carved from train
        assert totals(index) == {c: counts["train"][c] + counts["test"][c] for c in index.classes}
        assert len(index.splits["test"]) == 14 and result["images"] == 52
    elif kind == "chest-multilabel":
        assert result["images"] == len(everything(index)) == 52 and len(index.splits["test"]) == 14
        drawn = {c: n for c, n in totals(index).items() if n}
        assert drawn == {c: counts["train_val"].get(c, 0) + counts["test"].get(c, 0) for c in drawn}
        assert set(drawn) <= set(LABELS.values())
        with open(root / "Data_Entry_2017.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0][-1] == "" and len(rows[0]) == 12  # the 2017 file's trailing empty column
        table = {r[0]: set(r[1].split("|")) - {"No Finding"} for r in rows[1:]}
        for sample in everything(index):
            assert {c for c, v in zip(CHEXNET_CLASSES, sample.label) if v} == table[Path(sample.path).name]
    elif kind == "rsna-dicom":
        assert totals(index) == counts["all"] and len(everything(index)) == 52
        assert result["duplicate_rows"] > 0 and set(index.classes) == set(RSNA_CLASSES)
        assert len(index.splits["test"]) and len(index.splits["val"])
        for sample in everything(index):  # MONOCHROME1, rescaled, windowed or JPEG: air always comes out dark
            pixels = load_image(sample.path)
            assert pixels[:3, :3].mean() < pixels[15:25, 10:30].mean()
        assert all(result["storage"].values())  # every storage kind occurs
    else:
        assert totals(index) == {c: counts["all"][c] for c in ("benign", "malignant")}
        assert any("left out" in n and "'normal'" in n for n in index.notes)
        masks = list(root.rglob("*_mask*.png"))
        assert len(masks) == result["masks"] >= result["images"] and any("_mask_1" in m.name for m in masks)
        assert totals(read(root, variant="3-class")) == counts["all"]


def test_generation_is_deterministic_for_the_seed(tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    for kind in FOLDERS:
        first = generate(tmp_path / "a", kind, 6, 2, 3, size=32, seed=11)[0]
        second = generate(tmp_path / "b", kind, 6, 2, 3, size=32, seed=11)[0]
        other = generate(tmp_path / "c", kind, 6, 2, 3, size=32, seed=12)[0]
        assert digest(first) == digest(second), kind
        assert digest(first) != digest(other), kind
    with pytest.raises(ValueError, match="unknown phantom kind"):
        generate_phantoms("mri-brain", tmp_path / "x", 1, 1, 1, 32, 1)


def test_films_of_one_patient_share_the_anatomy():
    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    anatomy = chest_anatomy(np.random.default_rng(1))
    first = draw_chest(np.random.default_rng(2), 64, anatomy=anatomy)[0]
    follow_up = draw_chest(np.random.default_rng(3), 64, anatomy=anatomy)[0]
    stranger = draw_chest(np.random.default_rng(3), 64)[0]
    assert corr(first, follow_up) > corr(first, stranger) + 0.05
    with pytest.raises(ValueError, match="unknown chest finding"):
        draw_chest(np.random.default_rng(2), 32, findings=("fracture",))


# --- learnability ------------------------------------------------------------------------------------------------

def held_out_auc(index, size: int = 48, epochs: int = 8) -> dict[str, float]:
    """Train a tiny CNN on train, return the ROC-AUC per class on test (classes with both outcomes there)."""
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from medq.preprocess import PreprocessSpec, load_batch

    spec = PreprocessSpec(size, 1, "unit")
    x_train, y_train = load_batch(index.paths("train"), spec), index.labels("train")
    x_test, y_test = load_batch(index.paths("test"), spec), index.labels("test")
    multilabel = index.task == "multilabel"
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inputs = layers.Input(spec.input_shape)
    x = layers.Lambda(lambda t: (t - tf.reduce_mean(t, axis=[1, 2, 3], keepdims=True))
                      / (tf.math.reduce_std(t, axis=[1, 2, 3], keepdims=True) + 1e-3))(inputs)
    for filters in (16, 32, 32):
        x = layers.MaxPool2D()(layers.Conv2D(filters, 3, padding="same", activation="relu")(x))
    outputs = layers.Dense(len(index.classes), activation="sigmoid" if multilabel else "softmax")(layers.Flatten()(x))
    model = tf.keras.Model(inputs, outputs)
    model.compile(tf.keras.optimizers.Adam(2e-3), "binary_crossentropy" if multilabel else "categorical_crossentropy")
    model.fit(x_train, y_train, epochs=epochs, batch_size=16, verbose=0)
    scores = model.predict(x_test, verbose=0)
    return {c: float(roc_auc_score(y_test[:, i], scores[:, i])) for i, c in enumerate(index.classes)
            if 0 < y_test[:, i].sum() < len(y_test) and y_train[:, i].sum() > 0}


def test_chest_pneumonia_is_learnable(tmp_path):
    root, _ = generate(tmp_path, "chest-pneumonia", 300, 0, 150, size=48, seed=3)
    auc = held_out_auc(read(root, val_fraction=0.0))
    print(f"\nchest-pneumonia held-out AUC: {auc}")
    assert auc["PNEUMONIA"] > 0.75


def test_chest_multilabel_is_learnable(tmp_path):
    root, _ = generate(tmp_path, "chest-multilabel", 480, 0, 240, size=48, seed=3)
    auc = held_out_auc(read(root, val_fraction=0.0))
    print(f"\nchest-multilabel held-out AUC: {auc}")
    assert set(auc) == set(LABELS.values())  # every drawn finding, and only those
    assert np.mean(list(auc.values())) > 0.75 and min(auc.values()) > 0.5
    assert auc["Cardiomegaly"] > 0.9 and auc["Effusion"] > 0.9


def test_rsna_dicom_is_learnable(tmp_path):
    root, _ = generate(tmp_path, "rsna-dicom", 240, 0, 120, size=48, seed=3)
    auc = held_out_auc(read(root, val_fraction=0.0, test_fraction=0.33))
    print(f"\nrsna-dicom held-out AUC: {auc}")
    assert np.mean(list(auc.values())) > 0.75 and min(auc.values()) > 0.6


def test_busi_is_learnable(tmp_path):
    root, _ = generate(tmp_path, "busi", 160, 0, 80, size=48, seed=3)
    auc = held_out_auc(read(root, val_fraction=0.0, test_fraction=0.33), epochs=6)
    print(f"\nbusi held-out AUC: {auc}")
    assert auc["malignant"] > 0.75


def test_the_data_stage_never_leaves_half_a_phantom_dataset(tmp_path, monkeypatch):
    """Interrupted generation leaves nothing at data.root (a half dataset there would later pass for the user's
    own); a damaged marker regenerates; a folder without medq's marker (the user's data) is never touched."""
    import medq.data.phantoms as phantoms
    from medq.config import load_config
    from medq.pipeline import PHANTOM_MARKER, ensure_phantoms

    root = tmp_path / "chest_xray"
    config = load_config(None, [f"data.root={root}", "data.phantom.n_train=12", "data.phantom.n_val=2",
                                "data.phantom.n_test=4", "data.phantom.size=32"])
    real = phantoms.generate_chest_pneumonia

    def interrupted(folder, *args, **kwargs):
        real(folder, 2, 0, 0, size=32)
        raise KeyboardInterrupt

    monkeypatch.setattr(phantoms, "generate_chest_pneumonia", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_phantoms(config, phantoms=True)
    assert not root.exists()
    monkeypatch.setattr(phantoms, "generate_chest_pneumonia", real)
    assert ensure_phantoms(config, phantoms=True) and len(list(root.rglob("*.jpeg"))) == 12 + 2 + 4
    (root / PHANTOM_MARKER).write_text("{not json")
    assert ensure_phantoms(config, phantoms=True) and (root / PHANTOM_MARKER).read_text().startswith("{\n")
    own = tmp_path / "mine"
    (own / "train").mkdir(parents=True)
    assert not ensure_phantoms(load_config(None, [f"data.root={own}"])) and not any((own / "train").iterdir())


def test_two_data_stages_generate_one_phantom_folder_one_after_the_other(tmp_path, monkeypatch):
    """The data folder's lock: a second data stage waits, then finds the first one's complete dataset."""
    import threading

    import medq.data.phantoms as phantoms
    from medq.config import load_config
    from medq.pipeline import ensure_phantoms

    root = tmp_path / "chest_xray"
    config = load_config(None, [f"data.root={root}", "data.phantom.n_train=12", "data.phantom.n_val=2",
                                "data.phantom.n_test=4", "data.phantom.size=32"])
    real, active, overlaps, calls = phantoms.generate_chest_pneumonia, [0], [], []

    def slow(folder, *args, **kwargs):
        active[0] += 1
        overlaps.append(active[0])
        calls.append(folder)
        threading.Event().wait(0.5)  # long enough for the other thread to arrive while this one generates
        try:
            return real(folder, *args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(phantoms, "generate_chest_pneumonia", slow)
    generated: list[bool] = []
    threads = [threading.Thread(target=lambda: generated.append(ensure_phantoms(config, phantoms=True))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1 and len(calls) == 1 and sorted(generated) == [False, True]
    assert len(list(root.rglob("*.jpeg"))) == 12 + 2 + 4
