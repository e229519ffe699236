import re
from pathlib import Path

import pytest

from medq.config import Config, load_config, parse_override
from medq.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config(None)
    assert isinstance(config, Config)
    assert config.freeze.input_name == "input" and config.freeze.output_name == "output"


def test_all_shipped_stage_configs_load(repo_root):
    configs = [p for p in (Path(repo_root) / "configs").glob("*.yaml") if not p.name.endswith("deploy.yaml")]
    assert configs
    for path in configs:
        load_config(path)


def test_file_values_and_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  learning_rate: 0.01\nrun:\n  name: a\n")
    config = load_config(path, ["train.epochs=2", "tune.search_space.batch_size=[8, 16]"])
    assert config.train.epochs == 2
    assert config.train.learning_rate == 0.01
    assert config.tune.search_space["batch_size"] == [8, 16]
    assert config.run_dir.name == "a"


def test_int_is_accepted_where_float_is_expected(tmp_path):
    config = load_config(write(tmp_path, "train:\n  learning_rate: 1\n"))
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


@pytest.mark.parametrize("text, fragment", [
    ("train:\n  epochs: three\n", "train.epochs: expected an integer, got 'three'"),
    ("train:\n  epochs: 0\n", "train.epochs: must be greater than 0"),
    ("train:\n  epcohs: 3\n", "train: unknown key 'epcohs'"),
    ("trian:\n  epochs: 3\n", "unknown key 'trian'"),
    ("preprocess:\n  channels: 2\n", "preprocess.channels: 2 is not allowed"),
    ("preprocess:\n  normalization: zscore\n", "preprocess.normalization: 'zscore' is not allowed"),
    ("data:\n  val_fraction: 1.5\n", "data.val_fraction: must be in [0, 1)"),
    ("data:\n  strict: 'yes'\n", "data.strict: expected true or false"),
    ("benchmark:\n  precisions: [fp32, fp64]\n", "benchmark.precisions[1]: 'fp64' is not allowed"),
    ("- just\n- a list\n", "expected a mapping of sections"),
    ("train: [\n", "not valid YAML at line"),
    ("run:\n  objective: f1\n", "run.objective: 'f1' is not allowed; use one of 'auc', 'accuracy'"),
    ("train:\n  monitor: auc\nquantize:\n  metric: accuracy\n", "disagree, and one run.objective now drives"),
    ("run:\n  objective: auc\ntrain:\n  monitor: primary\n", "train.monitor: primary (accuracy), run.objective: auc disagree"),
])
def test_bad_values_are_rejected_with_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_environment_variables_expand_with_defaults(tmp_path, monkeypatch):
    path = write(tmp_path, "data:\n  root: ${DATA_DIR:-data}/chest_xray\nrun:\n  output_dir: ${MEDQ_TEST_OUT}\n")
    monkeypatch.setenv("DATA_DIR", "/mnt/d")
    monkeypatch.setenv("MEDQ_TEST_OUT", "/mnt/o")
    config = load_config(path)
    assert config.data.root == "/mnt/d/chest_xray"
    assert config.run.output_dir == "/mnt/o"
    monkeypatch.delenv("DATA_DIR")
    assert load_config(path).data.root == "data/chest_xray"
    monkeypatch.delenv("MEDQ_TEST_OUT")
    with pytest.raises(ConfigError, match=r"\$\{MEDQ_TEST_OUT\} is not set"):
        load_config(path)


def test_override_syntax_errors_are_clear():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.epochs")
    assert load_config(None, ["train.learning_rate=1e-3"]).train.learning_rate == 1e-3
    assert parse_override("a.b=true") == (["a", "b"], True)


def test_the_replaced_monitor_and_metric_settings_load_as_the_objective(tmp_path, caplog):
    assert load_config(None).run.objective == "auc"
    config = load_config(write(tmp_path, "train:\n  monitor: primary\nquantize:\n  metric: auto\n"))
    assert config.run.objective == "accuracy"
    assert not hasattr(config.train, "monitor") and not hasattr(config.quantize, "metric")
    said = [r.getMessage() for r in caplog.records]
    assert any("train.monitor is replaced by run.objective" in m and "read as run.objective: accuracy" in m
               for m in said)
    assert load_config(None, ["quantize.metric=auc", "run.objective=auc"]).run.objective == "auc"


# --- repeated keys: yaml.safe_load keeps the last block silently; the run config refuses them ---------------------

def test_a_repeated_section_is_refused_naming_the_file_the_key_and_both_lines(tmp_path):
    # the file: the first train block's epochs: 1 vanished and it trained the second block's 10 epochs
    path = write(tmp_path, "run:\n  name: a\ntrain:\n  epochs: 1\ndata:\n  strict: true\ntrain:\n  epochs: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: section 'train' appears 2 times (lines 3 and 7)")
    assert "\n" not in message


def test_a_repeated_nested_key_is_refused_with_its_dotted_name(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 1\n  batch_size: 8\n  epochs: 10\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'train.epochs' appears 2 times \(lines 2 and 4\)"):
        load_config(path)
    deeper = write(tmp_path, "train:\n  augment:\n    zoom: 0.1\n    zoom: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'train.augment.zoom' appears 2 times \(lines 3 and 4\)"):
        load_config(deeper)


def test_set_overrides_still_apply_over_a_strict_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 1\n  batch_size: 8\n")
    config = load_config(path, ["train.epochs=3", "train.epochs=4"])  # a repeated --set: the last one wins
    assert (config.train.epochs, config.train.batch_size) == (4, 8)


def test_null_reads_as_none_even_after_inc_rewired_the_global_safeloader(tmp_path, monkeypatch):
    import yaml

    # importing neural_compressor.conf.config makes every yaml.safe_load read null as {}
    monkeypatch.setitem(yaml.SafeLoader.yaml_constructors, "tag:yaml.org,2002:null", lambda loader, node: {})
    assert load_config(write(tmp_path, "data:\n  variant: null\n")).data.variant is None


def test_a_reader_registered_anywhere_is_an_allowed_data_format_and_cli_choice(tmp_path, monkeypatch):
    """The readers' registry is the one list of formats: registering a reader is all a new layout needs."""
    from medq.cli import build_parser
    from medq.data.readers import READERS

    path = write(tmp_path, "data:\n  format: probe-layout\n")
    with pytest.raises(ConfigError, match="probe-layout"):
        load_config(path)
    monkeypatch.setitem(READERS, "probe-layout", lambda root, **_: None)
    assert load_config(path).data.format == "probe-layout"
    assert build_parser().parse_args(["data", "check", "x", "--format", "probe-layout"]).format == "probe-layout"


def test_an_unknown_data_format_is_refused_with_the_registrys_names(tmp_path):
    from medq.data.readers import READERS

    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data:\n  format: nih\n"))
    message = str(err.value)
    assert "data.format: 'nih' is not allowed" in message
    listed = set(re.findall(r"'([\w-]+)'", message.split("; use ", 1)[1]))
    assert listed == {"auto", *READERS}
    assert {"kaggle-pneumonia", "nih-chestxray14", "rsna-pneumonia", "busi", "folder", "csv"} <= listed  # the six layouts


# --- probes of configs users write (bug bash): each failed on the code before its fix -------------------------

def refused(tmp_path: Path, text: str, *overrides: str) -> str:
    """The one-line ConfigError a config (or --set) stops with."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text) if text else None, list(overrides))
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("text, key", [
    ("preprocess:\n  channels: 3.0\n", "preprocess.channels"),  # was kept as the float 3.0, not the choice 3
    ("data:\n  bit_depth: 12.0\n", "data.bit_depth"),
])
def test_a_choice_of_numbers_takes_exactly_those_numbers(tmp_path, text, key):
    assert refused(tmp_path, text).startswith(f"{tmp_path / 'c.yaml'}: {key}: ")


@pytest.mark.parametrize("value", ["nan", ".nan", ".inf", "-.inf", "inf"])
def test_a_number_that_is_not_finite_is_refused(tmp_path, value):
    """NaN passed every range check (its comparisons are all false): a rotation of NaN degrees trained silently."""
    assert "train.augment.rotation_deg: expected a finite number" in refused(
        tmp_path, f"train:\n  augment:\n    rotation_deg: {value}\n")


@pytest.mark.parametrize("key", ["10", "~", "true"])
def test_an_unknown_key_that_yaml_reads_as_a_number_or_null_is_one_line(tmp_path, key):
    """sorted() of a str and an int key raised TypeError: a traceback instead of the unknown key."""
    assert "train: unknown key" in refused(tmp_path, f"train:\n  trian: 3\n  {key}: 5\n")


def test_a_class_named_no_is_refused_not_read_as_a_class_named_false(tmp_path):
    """YAML 1.1 reads the key NO as false; str(False) made a per-class threshold for a class 'False'."""
    message = refused(tmp_path, "thresholds:\n  per_class:\n    NO: {policy: youden}\n")
    assert "thresholds.per_class" in message and "quote" in message
    config = load_config(write(tmp_path, "thresholds:\n  per_class:\n    'NO': {policy: youden}\n"))
    assert list(config.thresholds.per_class) == ["NO"]


def test_a_string_setting_written_no_says_to_quote_it(tmp_path):
    assert "quote" in refused(tmp_path, "data:\n  variant: no\n")


def test_exponent_numbers_in_free_form_params_are_numbers(tmp_path):
    """PyYAML keeps 1e-3 a string; model.params passed the string '1e-3' to the model builder."""
    config = load_config(write(tmp_path, "model:\n  params:\n    dropout: 1e-3\n    widths: [2e1, 'x']\n"))
    assert config.model.params == {"dropout": 0.001, "widths": [20.0, "x"]}
    space = load_config(None, ["tune.search_space.learning_rate=[loguniform, 3e-4, 1E-2]"]).tune.search_space
    assert space["learning_rate"] == ["loguniform", 0.0003, 0.01]


@pytest.mark.parametrize("text, overrides", [
    ("run:\n  seed: 0755\n", ()),  # YAML 1.1 octal: 493
    ("serve:\n  drain_timeout_s: 1:30\n", ()),  # YAML 1.1 base 60: 90
    ("", ("run.seed=0755",)),
])
def test_numbers_yaml_11_reads_in_another_base_are_refused_with_their_line(tmp_path, text, overrides):
    message = refused(tmp_path, text, *overrides)
    assert "YAML 1.1" in message and ("line 2" in message if text else "--set" in message)


@pytest.mark.parametrize("override", ["data.root=", "run.output_dir= "])
def test_an_empty_folder_setting_is_refused_not_the_working_directory(tmp_path, override):
    """--set data.root= made the working directory the dataset."""
    assert "empty" in refused(tmp_path, "", override)


def test_a_folder_given_as_the_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["", "# train:\n#   epochs: 3\n", "---\n"])
def test_an_empty_config_file_is_refused_not_run_on_the_defaults(tmp_path, text):
    with pytest.raises(ConfigError, match=r"c\.yaml: empty \(no settings\)"):
        load_config(write(tmp_path, text))


def test_a_config_saved_with_a_bom_and_crlf_reads_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufefftrain:\r\n  epochs: 3\r\n".encode("utf-8"))  # Windows Notepad's 'UTF-8 with BOM'
    assert load_config(path).train.epochs == 3


@pytest.mark.parametrize("value", ["$OUTPUT_DIR/runs", "${OUTPUT_DIR:runs}", "${OUTPUT_DIR-runs}", "${OUTPUT_DIR"])
def test_a_variable_written_as_the_shell_would_but_not_expanded_is_refused(tmp_path, monkeypatch, value):
    """Left as written, the runs went to a folder literally named '$OUTPUT_DIR' in the working directory."""
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    message = refused(tmp_path, f"run:\n  output_dir: '{value}'\n")
    assert "run.output_dir" in message and "not expanded" in message and "${NAME:-default}" in message


def test_a_path_under_the_home_folder_is_expanded_as_the_shell_does(tmp_path, monkeypatch):
    """'~/runs' was a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, "run:\n  output_dir: ~/runs\ndata:\n  root: '~'\n"))
    assert config.run.output_dir == str(tmp_path / "home" / "runs") and config.data.root == str(tmp_path / "home")


@pytest.mark.parametrize("data, says", [
    ("train:\n  epochs: 3\n".encode("utf-16"), "not UTF-8"),  # Notepad's 'Unicode'
    ("run:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    (b"train:\n\tepochs: 3\n", "line 2"),  # a tab indent
])
def test_a_config_that_cannot_be_read_as_yaml_is_one_line_naming_it(tmp_path, data, says):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: ") and says in str(exc.value) and "\n" not in str(exc.value)
