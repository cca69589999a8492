"""Shared fixtures."""

import pytest

from tests.builders import make_cfg


@pytest.fixture
def cfg_factory(tmp_path):
    """Compose the stage config with the MLflow store inside the test's temp folder."""
    return lambda *overrides: make_cfg(tmp_path, *overrides)
