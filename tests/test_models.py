"""The model registry: every model builds for every head and channel count, trains a step, freezes and quantizes.

The small models (refkit-cnn, a tiny scaled-densenet) run everything here; the keras.applications nets
(chexnet/densenet121, densenet169, resnet50, vgg16) cost 10-40 s each at 32 px on 2 cores and are marked slow.
"""
from pathlib import Path

import numpy as np
import pytest

from medq.errors import ConfigError
from medq.flops import count_flops, model_facts
from medq.graph import freeze_keras, parity
from medq.losses import make_loss
from medq.models import build_model, head_activation, model_names
from medq.models.zoo import compound_scaling, load_weights_file, scaled_image_size

TINY = {"refkit-cnn": {"blocks": 2, "filters": 4, "dense_units": 8},
        "scaled-densenet": {"base_depths": [1, 2, 1, 1], "base_growth": 8, "phi": 1.0}}
HEAVY = ["chexnet", "densenet121", "densenet169", "resnet50", "vgg16"]
TASKS = {"binary": 2, "multiclass": 3, "multilabel": 5}
DEPLOY = Path(__file__).resolve().parents[1] / "configs" / "deploy.yaml"


def _labels(task, n, k, seed=0):
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        y = (rng.uniform(size=(n, k)) < 0.4).astype(np.float32)
        y[0], y[1] = 1, 0  # every label seen both ways
        return y
    return np.eye(k, dtype=np.float32)[np.arange(n) % k]


def _build_train_freeze(name, size, channels, task, **params):
    """Build, one optimizer step, freeze, parity; returns (model, graph_def, inputs)."""
    import tensorflow as tf

    k = TASKS[task]
    model = build_model(name, (size, size, channels), k, task, **params)
    assert model.layers[-1].name == "probabilities"
    assert model.output_shape == (None, k)
    x = np.random.default_rng(1).uniform(0, 1, (4, size, size, channels)).astype(np.float32)
    y = _labels(task, 4, k)
    model.compile(tf.keras.optimizers.Adam(1e-3), make_loss("auto", task, y.mean(axis=0)))
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "one step changed nothing"
    p = model.predict(x, verbose=0)
    if task == "multilabel":
        assert ((p > 0) & (p < 1)).all()
    else:
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    graph_def = freeze_keras(model)
    assert parity(model, graph_def, x) < 1e-4
    return model, graph_def, x


def _quantize(graph_def, x, tmp_path):
    """INC 2.6 post-training static quantization of a frozen graph (medq.inc.ptq.run_ptq with configs/deploy.yaml,
    which also makes INC's calibration capture work under pytest); returns the INT8 GraphDef."""
    from medq.inc.deploy import load_deploy
    from medq.inc.ptq import run_ptq

    class Calibration:
        batch_size = 4

        def __iter__(self):
            for i in range(0, len(x), 4):
                yield x[i:i + 4], np.zeros(len(x[i:i + 4]), np.int64)

    result = run_ptq(graph_def, load_deploy(DEPLOY), inputs=["input"], outputs=["output"], sampling_sizes=[len(x)],
                     calib_dataloader=Calibration(), eval_func=lambda model: 1.0, workspace=tmp_path / "inc",
                     log_path=tmp_path / "inc.log")
    assert result.graph_def is not None, f"INC returned no model (see {result.log_path})"
    assert any(n.op.startswith("Quantized") for n in result.graph_def.node)
    return result.graph_def


def test_registry_lists_every_model():
    assert set(model_names()) >= {"refkit-cnn", "chexnet", "scaled-densenet", "densenet121", "densenet169",
                                  "resnet50", "vgg16"}
    assert head_activation("multilabel") == "sigmoid" and head_activation("binary") == "softmax"
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("alexnet", (32, 32, 1), 2, "binary")
    with pytest.raises(ConfigError, match="does not take these parameters"):
        build_model("refkit-cnn", (32, 32, 1), 2, "binary", depth=3)


@pytest.mark.parametrize("name", sorted(TINY))
def test_heads_and_channels(name):
    """Binary and multi-class heads are softmax, multi-label sigmoid; 1- and 3-channel inputs both build."""
    for task, channels in (("binary", 1), ("multiclass", 3), ("multilabel", 1)):
        k = TASKS[task]
        model = build_model(name, (32, 32, channels), k, task, **TINY[name])
        p = model.predict(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, channels)).astype(np.float32), verbose=0)
        assert p.shape == (2, k)
        if task == "multilabel":
            assert model.get_layer("probabilities").activation.__name__ == "sigmoid"
        else:
            np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
        facts = model_facts(model)
        assert facts["parameters"] == model.count_params() and facts["flops"] > 0
        assert facts["input_shape"] == [32, 32, channels]


def _int8_concat(int8_graph, x):
    """medq.inc.rewrite on INC's graph: (report, INC graph's output, rewritten graph's output)."""
    from medq.graph import FrozenGraph
    from medq.inc.rewrite import rewrite_int8_concat

    rewritten, report = rewrite_int8_concat(int8_graph)
    if not report.groups and not report.int8_pads:
        assert rewritten == int8_graph
    outputs = []
    for graph in (int8_graph, rewritten):
        with FrozenGraph(graph) as runner:
            outputs.append(runner.predict(x))
    if not report.groups:  # only zero paddings moved into INT8: exact
        np.testing.assert_array_equal(outputs[0], outputs[1])
    return report, outputs[0], outputs[1]


# concatenation groups medq.inc.rewrite keeps in INT8: one per dense block, none without concatenations
CONCAT_GROUPS = {"refkit-cnn": 0, "scaled-densenet": 4, "chexnet": 4, "densenet121": 4, "densenet169": 4,
                 "resnet50": 0, "vgg16": 0}


def _learnable(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is their brightness (dark 0, bright 1): a model trained on them answers far from 0.5."""
    rng = np.random.default_rng(seed)
    bright = np.arange(n) % 2
    x = rng.uniform(0, 0.5, (n, 32, 32, 1)).astype(np.float32) + 0.5 * bright[:, None, None, None]
    return x.astype(np.float32), np.eye(2, dtype=np.float32)[bright]


@pytest.mark.parametrize("name", sorted(TINY))
def test_small_models_train_freeze_quantize(name, tmp_path):
    """INT8 answers as the FP32 model does, image by image. The model is trained until its answers spread (after
    one step they all sit within ~0.002 of 0.5, where "within 0.1 of FP32" holds for any graph, a constant one too)."""
    model, _, _ = _build_train_freeze(name, 32, 1, "binary", **TINY[name])
    x, y = _learnable(32)
    model.fit(x, y, batch_size=8, epochs=40, verbose=0)
    fp32 = model.predict(x, verbose=0)
    assert (fp32.argmax(axis=1) == y.argmax(axis=1)).mean() >= 0.9 and np.ptp(fp32[:, 1]) > 0.5  # a usable oracle
    report, out, rewritten_out = _int8_concat(_quantize(freeze_keras(model), x, tmp_path), x)
    assert out.shape == (32, 2) and report.groups == CONCAT_GROUPS[name]
    clear = np.abs(fp32[:, 1] - 0.5) > 0.1  # images FP32 does not call a near-tie
    for int8 in (out, rewritten_out):
        assert np.abs(int8 - fp32).max() < 0.1
        np.testing.assert_array_equal(int8[clear].argmax(axis=1), fp32[clear].argmax(axis=1))
        assert np.corrcoef(int8[:, 1], fp32[:, 1])[0, 1] > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_application_models_build_train_freeze_quantize(name, tmp_path):
    model, graph_def, x = _build_train_freeze(name, 32, 1, "multilabel")
    assert model_facts(model)["flops"] > 1e6
    report, out, rewritten_out = _int8_concat(_quantize(graph_def, np.concatenate([x, x]), tmp_path), x)
    assert report.groups == CONCAT_GROUPS[name] and not report.skipped
    assert np.abs(rewritten_out - out).max() < 0.1


def test_compound_scaling_follows_the_efficientnet_rule():
    s = compound_scaling(1.2, 1.1, 2.0)
    assert s["alpha"] * s["beta"] ** 2 * s["gamma"] ** 2 == pytest.approx(2.0)
    assert s["depth"] == pytest.approx(1.44) and s["width"] == pytest.approx(1.21)
    assert scaled_image_size(96, 1.2, 1.1, 0) == 96
    assert scaled_image_size(96, 1.2, 1.1, 1) == 112  # 96 · 1.1736 = 112.7 → multiple of 8
    with pytest.raises(ConfigError, match="alpha\\*beta\\^2 <= 2"):
        compound_scaling(1.5, 1.3, 1.0)


def test_scaled_densenet_depth_and_width_grow_with_phi():
    small = build_model("scaled-densenet", (32, 32, 1), 2, "binary", base_depths=[1, 2, 1, 1], base_growth=8)
    big = build_model("scaled-densenet", (32, 32, 1), 2, "binary", base_depths=[1, 2, 1, 1], base_growth=8,
                      phi=2.0)
    depth = lambda m: sum(1 for layer in m.layers if layer.name.endswith("_concat"))  # noqa: E731
    assert depth(big) == 6 and depth(small) == 5  # [1, 2, 1, 1] · α^φ = [1.44, 2.88, 1.44, 1.44] → 1, 3, 1, 1
    assert big.get_layer("conv1/conv").filters == 2 * round(8 * 1.1 ** 2)  # stem 2 · growth, growth 8·β^φ → 10
    assert count_flops(big) > count_flops(small)


def test_flops_count_matches_hand_count():
    import tensorflow as tf

    layers = tf.keras.layers
    inputs = layers.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, padding="same")(inputs)  # 2 · 8·8·4 · 3·3·2 = 9216
    x = layers.DepthwiseConv2D(3, padding="same")(x)  # 2 · 8·8·4 · 9 = 4608
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3)(x)  # 2 · 4 · 3 = 24
    assert count_flops(tf.keras.Model(inputs, outputs)) == 9216 + 4608 + 24


def test_rgb_weights_file_feeds_a_grayscale_model(tmp_path):
    rgb = build_model("refkit-cnn", (32, 32, 3), 4, "multiclass", **TINY["refkit-cnn"])
    path = tmp_path / "rgb.h5"
    rgb.save_weights(str(path))
    gray = build_model("refkit-cnn", (32, 32, 1), 2, "binary", weights=str(path), **TINY["refkit-cnn"])
    kernel = rgb.get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_allclose(gray.get_layer("block1_conv1").get_weights()[0], kernel.sum(axis=2, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_array_equal(gray.get_layer("fc").get_weights()[0], rgb.get_layer("fc").get_weights()[0])
    # the 4-class head does not fit the 2-class model: skipped, not an error
    assert gray.get_layer("probabilities").get_weights()[0].shape == (8, 2)
    counts = load_weights_file(gray, str(path))
    assert counts["skipped"] == 1 and counts["loaded"] > 5
    with pytest.raises(ConfigError, match="not found"):
        build_model("refkit-cnn", (32, 32, 1), 2, "binary", weights=str(tmp_path / "none.h5"))
    with pytest.raises(ConfigError, match="no weights for any layer"):
        build_model("scaled-densenet", (32, 32, 1), 2, "binary", weights=str(path), **TINY["scaled-densenet"])


@pytest.mark.slow
def test_chexnet_loads_local_imagenet_style_weights(tmp_path):
    """A keras.applications DenseNet121 notop file (here: untrained, saved locally) loads into a 1-channel CheXNet
    and into scaled-densenet at phi = 0, whose layer names and shapes are DenseNet121's."""
    import tensorflow as tf

    notop = tf.keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "densenet121_notop.h5"
    notop.save_weights(str(path))
    kernel = notop.get_layer("conv1/conv").get_weights()[0]
    chexnet = build_model("chexnet", (32, 32, 1), 14, "multilabel", weights=str(path))
    np.testing.assert_allclose(chexnet.get_layer("conv1/conv").get_weights()[0], kernel.sum(axis=2, keepdims=True),
                               rtol=1e-5)
    scaled = build_model("scaled-densenet", (32, 32, 1), 14, "multilabel", weights=str(path))
    assert scaled.count_params() == chexnet.count_params()
    np.testing.assert_array_equal(scaled.get_layer("conv5_block16_2_conv").get_weights()[0],
                                  notop.get_layer("conv5_block16_2_conv").get_weights()[0])


def test_losses_by_name():
    import tensorflow as tf

    y = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    p = tf.constant([[0.8, 0.3], [0.4, 0.9]])
    bce = float(make_loss("bce", "multilabel")(y, p))
    focal = float(make_loss("focal", "multilabel")(y, p))
    assert 0 < focal < bce  # focal loss down-weights the easy examples
    # CheXNet's weighting: positives of a rare label count more
    rare = float(make_loss("weighted-bce", "multilabel", np.array([0.1, 0.5]))(tf.constant([[1.0, 0.0]]),
                                                                                tf.constant([[0.5, 0.5]])))
    common = float(make_loss("weighted-bce", "multilabel", np.array([0.5, 0.5]))(tf.constant([[1.0, 0.0]]),
                                                                                  tf.constant([[0.5, 0.5]])))
    assert rare > common
    assert float(make_loss("cce", "binary")(y, p / tf.reduce_sum(p, axis=1, keepdims=True))) > 0
    assert float(make_loss("focal", "multiclass")(y, p)) > 0
    with pytest.raises(ConfigError, match="multilabel"):
        make_loss("weighted-bce", "binary")
    with pytest.raises(ConfigError, match="one class per image"):
        make_loss("cce", "multilabel")


# --- registry entries carry their input ------------------------------------------------------------------------------

def test_a_config_takes_the_preprocessing_it_leaves_out_from_the_model(tmp_path):
    from medq.config import load_config

    effnet = load_config(None, ["model.name=efficientnetb0"])
    assert (effnet.preprocess.image_size, effnet.preprocess.channels, effnet.preprocess.normalization) == (224, 3,
                                                                                                            "raw")
    assert effnet.preprocess_from_model == ["image_size", "channels", "normalization"]
    assert effnet.to_dict()["preprocess_from_model"] == effnet.preprocess_from_model  # what the manifest records
    given = load_config(None, ["model.name=efficientnetb0", "preprocess.image_size=64", "preprocess.channels=1"])
    assert (given.preprocess.image_size, given.preprocess.channels, given.preprocess.normalization) == (64, 1, "raw")
    assert given.preprocess_from_model == ["normalization"]
    # the models registered before entries carried their input keep the input their configs always had
    for name in ("refkit-cnn", "chexnet", "scaled-densenet", "densenet121", "resnet50", "vgg16"):
        pre = load_config(None, [f"model.name={name}"]).preprocess
        assert (pre.image_size, pre.channels, pre.normalization) == (96, 1, "unit"), name
    file = tmp_path / "c.yaml"
    file.write_text("model: {name: densenet121}\npreprocess: {image_size: 64, channels: 3, normalization: imagenet}\n")
    config = load_config(file)
    assert (config.preprocess.image_size, config.preprocess.normalization, config.preprocess_from_model) == (
        64, "imagenet", [])


def test_a_model_that_normalises_inside_is_never_normalised_twice(tmp_path):
    from medq.config import load_config

    with pytest.raises(ConfigError, match="normalises its input itself.*'imagenet' would normalise twice") as info:
        load_config(None, ["model.name=efficientnetb0", "preprocess.normalization=imagenet"])
    assert str(info.value).startswith("--set preprocess.normalization=imagenet: preprocess.normalization: ")
    file = tmp_path / "c.yaml"
    file.write_text("model: {name: efficientnetb0}\npreprocess: {normalization: unit}\n")
    with pytest.raises(ConfigError, match=f"^{file}: preprocess.normalization: efficientnetb0"):
        load_config(file)


def test_raw_pixels_are_scaled_once_by_the_model_itself():
    """efficientnetb0 fed medq's 'raw' preprocessing: its own Rescaling layer sees 0-255 pixels and makes [0, 1]."""
    import tensorflow as tf

    from medq.preprocess import PreprocessSpec, preprocess

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = preprocess(pixels, PreprocessSpec(32, 3, "raw"))
    np.testing.assert_array_equal(x, pixels.astype(np.float32))
    model = build_model("efficientnetb0", (32, 32, 3), 2, "binary")
    rescaling = next(layer for layer in model.layers if isinstance(layer, tf.keras.layers.Rescaling))
    np.testing.assert_allclose(rescaling(x[None]).numpy()[0], pixels / 255.0, rtol=1e-6)
    with pytest.raises(ConfigError, match="efficientnetb0 needs at least 32 px, got 16"):
        build_model("efficientnetb0", (16, 16, 3), 2, "binary")
