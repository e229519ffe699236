"""Shared fixtures. Tests use only data they generate; nothing is downloaded."""
from __future__ import annotations

import logging
import os
import time

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

def pytest_runtest_setup(item):
    """.ci/run's budget: a test not started by MEDQ_CI_DEADLINE (seconds since the epoch) is skipped with that
    reason, listed in the summary; without the variable (the README's command) every test runs."""
    deadline = os.environ.get("MEDQ_CI_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("not started: CI's time budget ran out (MEDQ_CI_DEADLINE, .ci/run)")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO
