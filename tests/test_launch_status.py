"""`status` without accounting: it falls back to squeue, then scontrol, then the manifest.

Accounting (slurmdbd) is shared by every test on the cluster and cannot be stopped for one test, so its
failure is reproduced with a `sacct` on PATH that fails the way sacct does when slurmdbd is down; the
jobs, squeue and scontrol are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.manifest import Manifest, job_entries
from launch.reporting.jobstate import current_views
from tests.slurm_helpers import SlurmCluster

pytestmark = pytest.mark.slurm

BROKEN_SACCT = """#!/bin/sh
echo "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent connection" >&2
echo "sacct: error: Problem talking to the database: Connection refused" >&2
exit 1
"""


def test_status_without_accounting_uses_squeue_then_scontrol_then_manifest(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    running = slurm_cluster.submit("sleep 30\n", "--time=2", workdir=tmp_path)
    done = slurm_cluster.submit("true\n", "--time=2", workdir=tmp_path)
    slurm_cluster.wait_until_done(done, timeout=60)
    slurm_cluster.wait_for_state(running, {"RUNNING"}, timeout=60)
    manifest = Manifest(tmp_path / "exp")
    with manifest.edit() as data:
        data["jobs"] = {
            "live": {"backend": "slurm", "job_id": str(running), "state": "PENDING"},
            "ended": {"backend": "slurm", "job_id": str(done), "state": "RUNNING"},
            # A job SLURM no longer knows (purged): only the manifest can tell.
            "old": {"backend": "slurm", "job_id": "999999", "state": "COMPLETED", "reason": "done long ago"},
        }
    entries = job_entries(manifest.read())
    views, source = current_views(entries)
    # With accounting: a live job's state is the controller's (accounting may lag a moment behind).
    assert source == "sacct" and views["live"].state == "RUNNING" and views["ended"].state == "COMPLETED"
    assert views["ended"].source == "sacct" and len(views["ended"].runs) == 1

    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "sacct").write_text(BROKEN_SACCT)
    (shim / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    views, source = current_views(entries)
    assert source == "squeue"
    assert (views["live"].state, views["live"].source, views["live"].nodelist) == ("RUNNING", "squeue", "node1")
    assert (views["ended"].state, views["ended"].source) == ("COMPLETED", "scontrol")
    assert (views["old"].state, views["old"].source, views["old"].reason) == ("COMPLETED", "manifest", "done long ago")
    slurm_cluster.cancel(running)
