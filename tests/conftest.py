"""Shared fixtures. Tests use only data they generate; nothing is downloaded."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _medq_logger_reset():
    """Tests that call the CLI in-process leave handlers on the 'medq' logger bound to that test's captured
    streams; later tests would log into closed streams."""
    yield
    logger = logging.getLogger("medq")
    logger.handlers.clear()
    logger.propagate = True  # the CLI stops propagation to the root logger, where pytest's caplog listens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def make_tiny_run():
    """``make_tiny_run(root)``: a 32-px refkit-cnn trained 2 epochs on 60 phantom radiographs under ``root``, frozen
    and quantized (a 2-epoch model: the criterion is wide, what is tested is the INT8 file's use). Returns
    (config, run_dir, root, data, test_files)."""
    from pathlib import Path
    from types import SimpleNamespace

    def build(root: Path) -> SimpleNamespace:
        from medq.config import load_config
        from medq.data.phantoms import generate_chest_pneumonia
        from medq.freeze import run_freeze
        from medq.quantize import run_quantize
        from medq.train import run_train

        data = root / "data"
        generate_chest_pneumonia(data, n_train=40, n_val=4, n_test=16, size=48, seed=1)
        deploy = Path(REPO) / "tests" / "fixtures" / "wide_criterion_deploy.yaml"
        config = load_config(None, [f"run.output_dir={root / 'output'}", f"data.root={data}", "run.name=tiny",
                                    "data.generate=false", "preprocess.image_size=32", "train.epochs=2",
                                    "model.params={blocks: 2, filters: 4, dense_units: 8}", f"quantize.deploy={deploy}"])
        run_train(config)
        run_freeze(config)
        run_quantize(config)
        return SimpleNamespace(config=config, run_dir=config.run_dir, root=root, data=data,
                               test_files=sorted(str(p) for p in (data / "test").rglob("*.jpeg")))
    return build


@pytest.fixture
def clean_thread_env(monkeypatch):
    """`medq predict` and `medq serve` set the thread variables (setdefault): undo that after the test."""
    from types import SimpleNamespace

    from medq.hwinfo import thread_environment

    for key in list(thread_environment(SimpleNamespace(intra_op_threads=1, inter_op_threads=1, kmp_blocktime=1,
                                                       kmp_affinity=""))):
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
