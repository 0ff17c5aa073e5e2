"""The unit layer imports no torch (its modules, and its tests as they run): seconds, no model."""

from __future__ import annotations

import os
import sys

import pytest

from tests.unit import conftest


def test_the_unit_suite_imports_no_torch(unit_only):
    if conftest.TORCH_BEFORE_UNIT:
        reason = ("torch was imported before tests/unit was collected (another layer came first on the "
                  "command line): run tests/unit first or alone to check it")
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    assert not conftest.TORCH_AFTER, f"collecting {conftest.TORCH_AFTER[0]} imported torch"
    if unit_only:  # every unit test has run (this one is last): none imported torch on the way
        assert "torch" not in sys.modules, "a unit test imported torch while it ran"
