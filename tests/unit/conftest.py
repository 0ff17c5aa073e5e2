"""tests/unit imports no torch: records whether collecting its modules brought torch in.

`make test` collects tests/unit first (pyproject testpaths), so the check below holds in a
whole-suite run as well as in `scripts/run_tests.sh tests/unit` (the inner loop, under 10 s).
"""

from __future__ import annotations

import sys

import pytest

#: torch already imported when the first unit module was collected (another layer was
#: collected first): the collection check cannot tell who imported it. None: not known yet.
TORCH_BEFORE_UNIT: bool | None = None
#: unit modules after whose collection torch was in sys.modules
TORCH_AFTER: list[str] = []
LAST = "test_the_unit_suite_imports_no_torch"


def _unit_module(nodeid: str) -> bool:
    return nodeid.startswith("tests/unit/") and nodeid.endswith(".py")


def pytest_collectstart(collector):
    global TORCH_BEFORE_UNIT
    if TORCH_BEFORE_UNIT is None and _unit_module(collector.nodeid):
        TORCH_BEFORE_UNIT = "torch" in sys.modules


def pytest_collectreport(report):
    if _unit_module(report.nodeid) and "torch" in sys.modules and not TORCH_BEFORE_UNIT and not TORCH_AFTER:
        TORCH_AFTER.append(report.nodeid)


def pytest_collection_modifyitems(session, config, items):
    """The no-torch test runs after every other unit test, so a test that imports torch while
    it runs is caught too (in a unit-only session)."""
    last = [i for i in items if i.name == LAST]
    if last:
        items.remove(last[0])
        units = [n for n, i in enumerate(items) if "tests/unit/" in str(i.fspath).replace("\\", "/")]
        items.insert(units[-1] + 1 if units else len(items), last[0])


@pytest.fixture
def unit_only(request) -> bool:
    """Whether this session runs only unit tests (then nothing else may have imported torch)."""
    return all("/tests/unit/" in str(i.fspath).replace("\\", "/") for i in request.session.items)
