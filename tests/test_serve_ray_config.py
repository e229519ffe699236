"""The Ray Serve route without a cluster: configs/ray/serve.yaml is a valid Ray Serve config whose import path and
deployment name are medq's, and `medq serve --ray` refuses what it can check before Ray starts, in one line.
(tests/test_serve_ray.py runs the deployment on a two-node loopback cluster.)"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from medq.cli import main  # noqa: E402
from medq.config import load_config  # noqa: E402
from medq.errors import MedqError  # noqa: E402
from medq.serve import ray_serve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_serve_config_file_is_valid_for_ray_and_points_at_medq():
    raw = yaml.safe_load((REPO / "configs/ray/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)  # Ray's own validation of `serve run` / `serve deploy` files
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), name) is ray_serve.app_builder
    assert [d.name for d in app.deployments] == [ray_serve.DEPLOYMENT]
    assert schema.proxy_location == "HeadOnly" and schema.http_options.host == "127.0.0.1"
    config = load_config(REPO / app.args["config"], app.args["set"])  # the medq side loads as `medq serve` loads it
    assert config.serve.model == "int8" and app.args["runs"]


def test_app_builder_refuses_a_missing_run_before_any_replica_starts(tmp_path):
    with pytest.raises(MedqError, match="no such run folder"):
        ray_serve.app_builder({"runs": [str(tmp_path / "nowhere")]})


def test_ray_flag_refuses_zero_replicas_in_one_line(tmp_path, capsys):
    assert main(["serve", "--ray", "127.0.0.1:1", "--replicas", "0", "--run", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "medq serve: error: --replicas 0: must be 1 or more"


def test_without_ray_installed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MedqError, match="env/setup.sh serve-ray"):
        ray_serve._import_ray()
