"""deploy.yaml against INC 2.6's schema: good files, each kind of bad value, unknown and repeated keys.

Pure Python: neither TensorFlow nor neural_compressor is imported here (tests/test_quantize.py runs INC's own schema
over the same files).
"""
from pathlib import Path

import pytest
import yaml

from medq.inc.deploy import DeployError, load_deploy, read_deploy_yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "configs" / "deploy.yaml"
REFKIT = REPO / "tests" / "fixtures" / "refkit_deploy.yaml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def with_changes(tmp_path, changes: dict) -> Path:
    """configs/deploy.yaml with dotted keys set (value None deletes the key)."""
    data = yaml.safe_load(DEPLOY.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return write(tmp_path, yaml.safe_dump(data, sort_keys=False))


def test_repo_deploy_file_is_valid_and_typed():
    deploy = load_deploy(DEPLOY)
    assert deploy.framework == "tensorflow" and deploy.inputs == ["input"] and deploy.outputs == ["output"]
    assert deploy.sampling_sizes == [100]
    assert (deploy.criterion.kind, deploy.criterion.tolerance) == ("relative", 0.01)
    assert (deploy.max_trials, deploy.timeout, deploy.random_seed) == (50, 0, 1978)
    assert deploy.strategy == "basic" and deploy.quant_level == 1 and deploy.use_bf16 is False
    assert deploy.performance.cores_per_instance == 2 and deploy.performance.num_of_instance == 1
    assert deploy.warnings == []
    # what the file leaves out is listed with INC's default, and what it sets is not
    defaults = deploy.inc_defaults()
    assert defaults["quantization.recipes.fast_bias_correction"] is False
    assert "tuning.exit_policy.max_trials" not in defaults and "quantization.calibration.sampling_size" not in defaults


def test_reference_kit_file_is_accepted_with_a_warning_naming_the_repeated_key():
    deploy = load_deploy(REFKIT)
    (warning,) = deploy.warnings
    assert "top-level key 'evaluation' appears 2 times (lines 14, 24)" in warning
    assert "the last one (line 24) wins" in warning and str(REFKIT) in warning
    # the winner is what yaml.safe_load (and INC) read: the second block, with the performance configs
    assert deploy.document == yaml.safe_load(REFKIT.read_text())
    assert deploy.performance.cores_per_instance == 2 and deploy.performance.num_of_instance == 1
    # nothing about calibration, criterion or exit policy in the file: INC's defaults, all listed
    defaults = deploy.inc_defaults()
    assert defaults["quantization.calibration.sampling_size"] == [100]
    assert defaults["tuning.accuracy_criterion.relative"] == 0.01
    assert defaults["tuning.exit_policy.max_trials"] == 100 and defaults["tuning.exit_policy.timeout"] == 0
    assert defaults["tuning.random_seed"] == 1978 and defaults["quantization.quant_level"] == "auto"
    assert deploy.inputs == [] and deploy.outputs == []  # taken from the run's manifest at quantize time
    assert any("evaluation.accuracy.metric" in note and "task metric" in note for note in deploy.notes)


def test_repeated_nested_key_is_reported_too(tmp_path):
    path = write(tmp_path, "model: {name: m, framework: tensorflow}\n"
                           "tuning:\n  exit_policy:\n    max_trials: 5\n    max_trials: 7\n")
    deploy = load_deploy(path)
    assert deploy.max_trials == 7
    assert "key 'max_trials' appears 2 times (lines 4, 5); the last one (line 5) wins" in deploy.warnings[0]
    assert "top-level" not in deploy.warnings[0]


def test_values_in_inc_spellings(tmp_path):
    path = with_changes(tmp_path, {"quantization.calibration.sampling_size": "50, 100",
                                   "tuning.accuracy_criterion": {"absolute": "2%"},
                                   "model.inputs": "input", "quantization.quant_level": None})
    deploy = load_deploy(path)
    assert deploy.sampling_sizes == [50, 100]
    assert (deploy.criterion.kind, deploy.criterion.tolerance) == ("absolute", 0.02)
    assert deploy.criterion.threshold(0.9) == pytest.approx(0.88) and deploy.criterion.met(0.9, 0.88)
    # a strategy name without quant_level: INC's default 'auto' would ignore the name, so medq sets 1 and says so
    assert deploy.quant_level == 1 and any("quant_level set to 1" in note for note in deploy.notes)


BAD = [
    ({"tunning": {"random_seed": 1}}, "tunning: unknown key", "did you mean 'tuning'"),
    ({"tuning.exit_policy.max_trial": 5}, "tuning.exit_policy.max_trial: unknown key", "did you mean 'max_trials'"),
    ({"tuning.exit_policy.max_trials": "ten"}, "tuning.exit_policy.max_trials: expected a whole number", "write e.g."),
    ({"tuning.exit_policy.max_trials": 0}, "tuning.exit_policy.max_trials: must be at least 1", "write e.g."),
    ({"tuning.exit_policy.timeout": -5}, "tuning.exit_policy.timeout: must be at least 0", "seconds"),
    ({"tuning.random_seed": 1.5}, "tuning.random_seed: expected a whole number", "1978"),
    ({"tuning.accuracy_criterion.relative": 1.5}, "tuning.accuracy_criterion.relative: must be a fraction below 1",
     "relative: 0.01"),
    ({"tuning.accuracy_criterion.relative": "1e-2"}, "tuning.accuracy_criterion.relative: expected a tolerated loss",
     "YAML reads 1e-2 as text"),
    ({"tuning.accuracy_criterion.absolute": 0.01}, "tuning.accuracy_criterion: has both relative and absolute",
     "keep one"),
    ({"tuning.accuracy_criterion": {"higher_is_better": True}}, "tuning.accuracy_criterion: has neither", "relative"),
    ({"tuning.accuracy_criterion.higher_is_better": False}, "tuning.accuracy_criterion.higher_is_better: false",
     "write true"),
    ({"quantization.calibration.sampling_size": 0}, "quantization.calibration.sampling_size: expected a positive",
     "sampling_size: 100"),
    ({"quantization.calibration.sampling_size": "many"}, "quantization.calibration.sampling_size: expected a positive",
     "sampling_size: 100"),
    ({"quantization.calibration.dataloader": {"batch_size": 8}}, "quantization.calibration.dataloader: INC knows",
     "remove it"),
    ({"quantization.approach": "post_training_dynamic_quant"}, "quantization.approach: 'post_training_dynamic_quant'",
     "post_training_static_quant"),
    ({"quantization.quant_level": "auto"}, "quantization.quant_level: 'auto' makes INC ignore", "quant_level: 1"),
    ({"quantization.optype_wise": {"Conv2D": {"activation": {"dtype": ["fp16"]}}}},
     "quantization.optype_wise.Conv2D.activation.dtype: 'fp16' is not a dtype", "int8"),
    ({"quantization.optype_wise": {"Conv2D": {"activation": {"dtype": "fp32"}}}},
     "quantization.optype_wise.Conv2D.activation.dtype: expected a list", "[int8]"),
    ({"quantization.model_wise": {"weight": {"bit": 4.0}}}, "quantization.model_wise.weight.bit: INC knows",
     "PyTorch-only"),
    ({"model.framework": "pytorch"}, "model.framework: 'pytorch' is not allowed: medq quantizes frozen TensorFlow",
     "'tensorflow'"),
    ({"model.name": None}, "model.name: is missing", "requires it"),
    ({"model.inputs": 3}, "model.inputs: expected a tensor name", "inputs: input"),
    ({"device": "gpu"}, "device: 'gpu' is not allowed: medq quantizes for Intel CPUs", "'cpu'"),
    ({"use_bf16": "maybe"}, "use_bf16: expected true or false", "write true or false"),
    ({"tuning.strategy.name": "sigopt"}, "tuning.strategy.name: 'sigopt' is not allowed", "'basic'"),
    ({"tuning.workspace": {"resume": "nc_workspace/history.snapshot"}}, "tuning.workspace.resume: INC knows",
     "pickle"),
    ({"pruning": {"approach": {"weight_compression": {}}}}, "pruning: INC knows this key", "remove it"),
    ({"evaluation.performance.configs.cores_per_instance": 0},
     "evaluation.performance.configs.cores_per_instance: must be at least 1", "write e.g."),
    ({"evaluation.accuracy": {"iteration": 10}}, "evaluation.accuracy.iteration: INC knows",
     "whole validation split"),
]


@pytest.mark.parametrize("changes, where, fix", BAD, ids=[next(iter(c)) + "-" + str(i) for i, (c, _, _) in
                                                          enumerate(BAD)])
def test_each_wrong_key_or_value_is_one_line_naming_file_and_key(tmp_path, changes, where, fix):
    path = with_changes(tmp_path, changes)
    with pytest.raises(DeployError) as caught:
        load_deploy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert where in message and fix in message, message
    assert "\n" not in message


def test_model_section_is_required(tmp_path):
    with pytest.raises(DeployError, match=r"deploy.yaml: model: is missing"):
        load_deploy(write(tmp_path, "version: 2.0\ntuning: {random_seed: 1}\n"))


@pytest.mark.parametrize("text, expected", [
    ("model: [unclosed\n", "not valid YAML at line"),
    ("- just\n- a list\n", "expected INC's deploy.yaml mapping"),
    ("model: {name: m, framework: tensorflow}\nquantization: 5\n", "quantization: expected a section of keys"),
])
def test_malformed_files(tmp_path, text, expected):
    with pytest.raises(DeployError) as caught:
        load_deploy(write(tmp_path, text))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(DeployError, match="deploy file not found; pass an INC deploy.yaml with --deploy"):
        load_deploy(tmp_path / "nope.yaml")


def test_reader_keeps_null_as_none_even_after_inc_rewired_safeloader(tmp_path, monkeypatch):
    # importing neural_compressor.conf.config makes every SafeLoader read null as {}; deploy.yaml must not care
    monkeypatch.setitem(yaml.SafeLoader.yaml_constructors, "tag:yaml.org,2002:null", lambda loader, node: {})
    path = write(tmp_path, "model: {name: m, framework: tensorflow}\ntuning: {workspace: {path: null}}\n")
    document, repeated = read_deploy_yaml(path)
    assert document["tuning"]["workspace"]["path"] is None and repeated == []
