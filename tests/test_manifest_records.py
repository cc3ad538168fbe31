"""The experiment's records: one writer per file, and the view merged from them (jobs.manifest, jobs.records).

Each case states the order the rule gives by hand: (submission, attempt, phase), compared left to right.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
from pathlib import Path

from jobs.manifest import JobEntry, JobRecord, Manifest, job_entries
from jobs.records import CLOSED
from jobs.runner import cancel_dependents
from jobs.states import JobState


def _submitted(manifest: Manifest, name: str, job_ids: list[str], depends_on: tuple[str, ...] = ()) -> None:
    """As the SLURM backend leaves a job after its submissions (PENDING as of the latest)."""
    with manifest.edit() as data:
        data["jobs"][name] = {"task": "pretrain", "backend": "local", "depends_on": list(depends_on)}
        data["jobs"][name]["submissions"] = [{"job_id": j, "time": "t"} for j in job_ids]
    manifest.update_job(name, state=JobState.PENDING, reason=None)


def test_a_job_that_started_before_the_launcher_recorded_its_submission_shows_running(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    _submitted(manifest, "pretrain", [])
    record = manifest.job_record("pretrain", submission=1)
    assert record.start_attempt({"job_id": "7"}) == 1  # order (1, 1, 1)
    _submitted(manifest, "pretrain", ["7"])  # the launcher writes PENDING afterwards: order (1, 0, 0)
    job = manifest.job("pretrain")
    assert (job["state"], job["order"], job["submissions"]) == ("RUNNING", [1, 1, 1], [{"job_id": "7", "time": "t"}])


def test_a_failure_closes_its_submission_and_a_new_submission_reopens_the_job(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    _submitted(manifest, "pretrain", ["7"])
    record = manifest.job_record("pretrain", submission=1)
    n = record.start_attempt({"job_id": "7"})
    record.set_state(JobState.FAILED, "boom", n, JobRecord.END)  # (1, CLOSED, 2)
    record.set_state(JobState.REQUEUED, None, n, JobRecord.VERDICT)  # (1, 1, 3): earlier than the failure, ignored
    assert manifest.job("pretrain")["state"] == JobState.FAILED
    assert manifest.job("pretrain")["order"] == [1, CLOSED, 2]
    _submitted(manifest, "pretrain", ["7", "8"])  # submitted again: PENDING at (2, 0, 0)
    assert (manifest.job("pretrain")["state"], manifest.job("pretrain")["reason"]) == ("PENDING", None)
    again = manifest.job_record("pretrain", submission=2)
    assert again.start_attempt({"job_id": "8"}) == 2  # attempt numbers run on across submissions
    assert [a["job_id"] for a in manifest.job("pretrain")["attempts"]] == ["7", "8"]


def test_a_failing_job_cancels_its_dependents_in_its_own_record(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    _submitted(manifest, "pretrain", ["7"])
    _submitted(manifest, "linprobe", ["8"], depends_on=("pretrain",))
    _submitted(manifest, "finetune", ["9"], depends_on=("linprobe",))  # transitively
    _submitted(manifest, "fastprobe", [], depends_on=())
    record = manifest.job_record("pretrain", submission=1)
    assert cancel_dependents(manifest, "pretrain", "pretrain failed: boom", record) == ["linprobe", "finetune"]
    launcher = json.loads(manifest.path.read_text())
    assert all(launcher["jobs"][j]["state"] == "PENDING" for j in ("linprobe", "finetune"))  # not written there
    view = manifest.read()["jobs"]
    assert view["linprobe"]["state"] == view["finetune"]["state"] == JobState.CANCELLED
    assert view["linprobe"]["reason"] == "dependency pretrain failed: boom"
    assert view["linprobe"]["order"] == [1, CLOSED, 1] and view["fastprobe"]["state"] == JobState.PENDING
    _submitted(manifest, "linprobe", ["8", "10"], depends_on=("pretrain",))  # the next pipeline submits it again
    assert manifest.job("linprobe")["state"] == JobState.PENDING


def test_launch_cancel_outranks_what_the_cancelled_attempt_writes_as_it_ends(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    _submitted(manifest, "pretrain", ["7"])
    record = manifest.job_record("pretrain", submission=1)
    n = record.start_attempt({"job_id": "7"})
    manifest.update_job("pretrain", state=JobState.CANCELLED, reason="cancelled with `launch cancel`")  # (1, CLOSED, 0)
    record.set_state(JobState.INTERRUPTED, "SIGTERM", n, JobRecord.END)  # (1, 1, 2)
    assert (manifest.job("pretrain")["state"], manifest.job("pretrain")["reason"]) == (
        "CANCELLED",
        "cancelled with `launch cancel`",
    )


def test_an_experiment_in_the_earlier_one_file_format_reads_unchanged_and_continues(tmp_path: Path) -> None:
    # manifest.json as the launcher and its jobs wrote it before the records: attempts and states in one file.
    earlier = {
        "version": 1,
        "name": "exp",
        "config_hash": "abc",
        "jobs": {
            "pretrain": {
                "task": "pretrain",
                "backend": "slurm",
                "job_id": "7",
                "submissions": [{"job_id": "7", "time": "t"}],
                "state": "REQUEUED",
                "reason": None,
                "attempts": [
                    {"n": 1, "job_id": "7", "start": "s1", "end": "e1", "cause": "preempted"},
                    {"n": 2, "job_id": "7", "start": "s2"},
                ],
            }
        },
    }
    (tmp_path / "manifest.json").write_text(json.dumps(earlier))
    manifest = Manifest(tmp_path)
    view = manifest.read()
    assert view["name"] == "exp" and view["config_hash"] == "abc"
    job = view["jobs"]["pretrain"]
    assert (job["state"], job["order"]) == ("REQUEUED", [1, 0, 0])  # an order-less state ranks as the launcher's
    assert [a["n"] for a in job["attempts"]] == [1, 2] and job["job_id"] == "7"
    # The next attempt of the same submission closes attempt 2 in its own record and follows on as attempt 3.
    record = manifest.job_record("pretrain", submission=0)  # a spec without a number: the latest submission, 1
    record.update_attempt(2, end="unknown", cause="killed")
    assert record.start_attempt({"job_id": "7", "start": "s3"}) == 3
    job = manifest.job("pretrain")
    assert [(a["n"], a.get("cause")) for a in job["attempts"]] == [(1, "preempted"), (2, "killed"), (3, None)]
    assert job["attempts"][1]["start"] == "s2"  # the earlier fields of attempt 2 travel with the copy
    assert (job["state"], job["order"]) == ("RUNNING", [1, 3, 1])
    assert json.loads((tmp_path / "manifest.json").read_text()) == earlier  # the job never wrote the launcher's file


# ---- two processes updating at once -------------------------------------------------------------------------
UPDATES = 60


def _refuse_locks(*_args, **_kwargs) -> None:
    raise AssertionError("a job's writer took a lock")


def _job_writer(experiment: str, name: str, rank: int, start, errors) -> None:
    try:
        fcntl.flock = _refuse_locks  # a job must not need a lock: on Lustre it may not hold across nodes
        manifest = Manifest(experiment)
        start.wait()
        record = manifest.job_record(name, submission=1, rank=rank)
        if rank:  # another rank met a real error while rank 0 keeps writing
            record.set_state(JobState.FAILED, f"rank {rank}: boom", None, JobRecord.END)
            return
        n = record.start_attempt({"job_id": name})
        for i in range(UPDATES):
            record.update_attempt(n, **{f"field_{i}": i})
    except BaseException as exc:  # reported to the test: an exception in a child is otherwise only printed
        errors.put(f"{name} rank {rank}: {exc!r}")


def _launcher_writer(experiment: str, start) -> None:
    manifest = Manifest(experiment)
    start.wait()
    for i in range(UPDATES):
        manifest.update_job("pretrain", **{f"launcher_{i}": i})


def test_jobs_and_the_launcher_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    for name in ("pretrain", "linprobe"):
        _submitted(manifest, name, ["1"])
    ctx = multiprocessing.get_context("spawn")
    start, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_launcher_writer, args=(str(tmp_path), start))]
    procs += [ctx.Process(target=_job_writer, args=(str(tmp_path), "pretrain", 0, start, errors))]
    procs += [ctx.Process(target=_job_writer, args=(str(tmp_path), "pretrain", 1, start, errors))]
    procs += [ctx.Process(target=_job_writer, args=(str(tmp_path), "linprobe", 0, start, errors))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert errors.empty(), errors.get()
    view = manifest.read()["jobs"]
    for name in ("pretrain", "linprobe"):
        (attempt,) = view[name]["attempts"]
        assert [attempt[f"field_{i}"] for i in range(UPDATES)] == list(range(UPDATES)), name
    assert [view["pretrain"][f"launcher_{i}"] for i in range(UPDATES)] == list(range(UPDATES))
    assert (view["pretrain"]["state"], view["pretrain"]["reason"]) == ("FAILED", "rank 1: boom")  # (1, CLOSED, 2)
    assert view["linprobe"]["state"] == JobState.RUNNING
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        "linprobe.json",
        "pretrain.json",
        "pretrain.rank1.json",
    ]


def test_job_entries_type_the_merged_view(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    _submitted(manifest, "pretrain", ["7", "8"])
    with manifest.edit() as data:
        data["jobs"]["pretrain"].update(job_id="8", run_dir="pretrain", nodes=2, gpus_per_node=4)
    manifest.job_record("pretrain", submission=2).start_attempt({"job_id": "8"})  # the job's own record: RUNNING
    manifest.job_record("byhand", submission=1).start_attempt({"job_id": None})  # a job run by hand into the folder

    entries = job_entries(manifest.read())
    assert list(entries) == ["pretrain", "byhand"]
    pretrain = entries["pretrain"]
    assert isinstance(pretrain, JobEntry) and pretrain.state is JobState.RUNNING  # the record's state, typed
    assert (pretrain.task, pretrain.backend, pretrain.job_id, pretrain.nodes, pretrain.gpus_per_node) == (
        "pretrain", "local", "8", 2, 4,
    )  # fmt: skip
    assert (pretrain.submission_count, pretrain.earlier_job_ids) == (2, ["7"])
    assert [a["n"] for a in pretrain.attempts] == [1]
    # What the launcher never wrote falls back to the job's name and to nothing.
    byhand = entries["byhand"]
    assert (byhand.task, byhand.run_dir, byhand.backend, byhand.job_id, byhand.submission_count) == (
        "byhand", "byhand", None, None, 0,
    )  # fmt: skip
    assert byhand.state is JobState.RUNNING and byhand.depends_on == ()
    assert job_entries(None) == {} and job_entries({"name": "empty"}) == {}
    # A state word the vocabulary does not have reads as UNKNOWN.
    with manifest.edit() as data:
        data["jobs"]["odd"] = {"state": "WEIRD"}
    assert job_entries(manifest.read())["odd"].state is JobState.UNKNOWN
