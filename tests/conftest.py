"""Test set-up shared by every test file: the SLURM cluster fixture and the rule that CI runs slurm tests.

Tests marked ``@pytest.mark.slurm`` get the ``slurm_cluster`` fixture automatically. Outside CI a
missing cluster skips them (with the command that starts one); with ``CI=true`` it fails them, and a
slurm test that skips for any other reason fails too, so CI can never pass without running them.
"""

from __future__ import annotations

import os

import pytest

from tests.slurm_helpers import SlurmCluster, find_slurm_conf

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running SLURM test cluster (``SLURM_CONF``, or the local one from ``make cluster-up``)."""
    conf = find_slurm_conf()
    problem = "no cluster configured" if conf is None else SlurmCluster(conf).ping()
    if problem is None:
        return SlurmCluster(conf)
    message = f"SLURM test cluster not available ({problem}); start it with `make cluster-up`"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: slurm tests must run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _slurm_marker_needs_cluster(request: pytest.FixtureRequest) -> None:
    # Marking a test `slurm` is enough to get the availability check, even if it never names the fixture.
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    skipped = report.skipped and not hasattr(report, "wasxfail")
    if IN_CI and skipped and item.get_closest_marker("slurm") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"slurm test skipped in CI, which must run it: {reason}"
