import subprocess
import sys

import numpy as np
import pytest

from medq import artifacts, runrecord
from medq.config import load_config
from medq.errors import MedqError
from medq.freeze import run_freeze
from medq.graph import freeze_keras, parity
from medq.graph import FrozenGraph, ModelFileError, read_graph_def
from medq.models import build_model


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("refkit-cnn", (24, 24, 1), 3, "multiclass", blocks=2, filters=4, dense_units=8)


def test_frozen_graph_equals_keras_and_has_stable_names(tiny_model):
    graph_def = freeze_keras(tiny_model)
    names = [n.name for n in graph_def.node]
    assert "input" in names and "output" in names
    assert not any(n.op in ("VarHandleOp", "ReadVariableOp") for n in graph_def.node)
    x = np.random.default_rng(1).uniform(0, 1, (5, 24, 24, 1)).astype(np.float32)
    assert parity(tiny_model, graph_def, x) < 1e-6


def test_frozen_file_reloads_in_a_fresh_process_with_identical_outputs(tiny_model, tmp_path):
    pb = tmp_path / "m.pb"
    pb.write_bytes(freeze_keras(tiny_model).SerializeToString())
    x = np.random.default_rng(2).uniform(0, 1, (3, 24, 24, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    here = FrozenGraph(pb).predict(x)
    code = ("import numpy as np, sys; from medq.graph import FrozenGraph; "
            "np.save(sys.argv[2], FrozenGraph(sys.argv[1]).predict(np.load(sys.argv[3])))")
    subprocess.run([sys.executable, "-c", code, str(pb), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                   check=True)
    np.testing.assert_array_equal(here, np.load(tmp_path / "y.npy"))
    np.testing.assert_allclose(here.sum(axis=1), 1.0, atol=1e-5)


def test_run_freeze_writes_pb_and_manifest(tiny_model, tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'absent'}",
                                "data.generate=false"])
    keras_path = config.run_dir / "model.keras"
    keras_path.parent.mkdir(parents=True)
    tiny_model.save(keras_path)
    runrecord.commit(config.run_dir, "train", artifacts={"keras_model": keras_path})
    pb = run_freeze(config)
    manifest = runrecord.read_manifest(config.run_dir)
    assert manifest["artifacts"]["fp32_pb"]["sha256"] == artifacts.sha256(pb)
    assert manifest["input_name"] == "input" and manifest["output_name"] == "output"
    assert manifest["stages"]["freeze"]["parity_max_abs_diff"] < 1e-4


def test_missing_or_bad_model_files_give_one_line(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}"])
    with pytest.raises(MedqError, match="no trained model in this run"):
        run_freeze(config)
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ModelFileError, match="bad.pb: not a frozen TensorFlow GraphDef"):
        read_graph_def(bad)
    with pytest.raises(ModelFileError, match="model file not found"):
        read_graph_def(tmp_path / "none.pb")
