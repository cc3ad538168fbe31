"""Telling preemption from timeout from SLURM's record; the requeue budget; SLURM output parsing.

The `scontrol show job -o` lines below were printed by the project's loopback cluster (slurm 22.05) at the
moment a job step received its signal; the classification must read them the way the job runner does.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from jobs import interruption as intr
from jobs.dist_env import detect_place, first_hostname, port_for_job
from jobs.slurm_cli import parse_duration_s, parse_scontrol_record

_COMMON = (
    "JobName=job.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901754 Nice=0 Account=root QOS=normal "
)
_TAIL = (
    " Partition=low AllocNode:Sid=localhost:6202 ReqNodeList=(null) ExcNodeList=(null) NodeList=node[1-2] "
    "BatchHost=node1 NumNodes=2 NumCPUs=4 NumTasks=2 CPUs/Task=2 TRES=cpu=4,node=2,billing=4 "
    "Command=/tmp/sprobe/job.sh WorkDir=/tmp/sprobe StdErr=/tmp/sprobe/6.out StdIn=/dev/null StdOut=/tmp/sprobe/6.out "
    "Power="
)
# A high-priority job preempted this one 4 s after it started: PreemptTime is set, the job still RUNNING.
PREEMPTED = (
    "JobId=6 " + _COMMON + "JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:04 TimeLimit=00:10:00 TimeMin=N/A SubmitTime=2026-11-28T00:13:43 "
    "StartTime=2026-11-28T00:13:43 EndTime=2026-11-28T00:13:57 PreemptEligibleTime=2026-11-28T00:13:43 "
    "PreemptTime=2026-11-28T00:13:47 SuspendTime=None" + _TAIL
)
# `scontrol requeue`: the restart count is already bumped and the record reset (RunTime 0, COMPLETING).
REQUEUED = (
    "JobId=1 " + _COMMON + "JobState=COMPLETING Reason=None Dependency=(null) Requeue=1 Restarts=2 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:10:00 TimeMin=N/A SubmitTime=2026-11-28T00:15:44 "
    "StartTime=2026-11-28T00:15:56 EndTime=2026-11-28T00:25:56 Deadline=N/A SuspendTime=None" + _TAIL
)
# `scancel --signal=USR2` 5 s into a 10-minute limit.
SIGNALLED = (
    "JobId=1 " + _COMMON + "JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=2 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:05 TimeLimit=00:10:00 TimeMin=N/A StartTime=2026-11-28T00:16:04 "
    "SuspendTime=None" + _TAIL
)
# Plain `scancel`: COMPLETING while it kills, restart count unchanged.
CANCELLED = (
    "JobId=1 " + _COMMON + "JobState=COMPLETING Reason=None Dependency=(null) Requeue=1 Restarts=3 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:05 TimeLimit=00:10:00 TimeMin=N/A StartTime=2026-11-28T00:16:13 "
    "SuspendTime=None" + _TAIL
)


def test_scontrol_record_parsing_keeps_values_with_special_characters() -> None:
    record = parse_scontrol_record(PREEMPTED)
    assert record["JobState"] == "RUNNING" and record["PreemptTime"] == "2026-11-28T00:13:47"
    assert record["NodeList"] == "node[1-2]" and record["TRES"] == "cpu=4,node=2,billing=4"
    assert record["AllocNode:Sid"] == "localhost:6202" and record["Power"] == ""


@pytest.mark.parametrize(
    "text, seconds",
    [("00:10:00", 600), ("10:05", 605), ("1-02:03:04", 93784), ("UNLIMITED", None), ("", None), ("2-00:00:00", 172800)],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration_s(text) == seconds


def test_preemption_is_read_from_preempt_time_not_elapsed_time() -> None:
    start = datetime.fromisoformat("2026-11-28T00:13:43")
    found = intr.classify(["SIGTERM"], parse_scontrol_record(PREEMPTED), start, signal_delay_s=90)
    assert found.cause == intr.PREEMPTED and found.needs_self_requeue is False
    assert found.cause in intr.REQUEUED_BY_SLURM  # SLURM puts a preempted job back by itself
    # The same record with USR2 (preempt_send_user_signal) is still a preemption, not a timeout.
    assert intr.classify(["SIGUSR2"], parse_scontrol_record(PREEMPTED), start, 90).cause == intr.PREEMPTED
    aware = start.astimezone()  # what the runner holds: its own clock, with a time zone
    assert intr.classify(["SIGTERM"], parse_scontrol_record(PREEMPTED), aware, 90).cause == intr.PREEMPTED
    # A PreemptTime of an earlier attempt does not count for this one.
    later = datetime.fromisoformat("2026-11-28T00:20:00")
    assert intr.classify(["SIGUSR2"], parse_scontrol_record(PREEMPTED), later, 90).cause == intr.SIGNALLED


def test_usr2_far_from_the_limit_is_a_signal_and_near_it_a_timeout() -> None:
    record = parse_scontrol_record(SIGNALLED)
    assert intr.classify(["SIGUSR2"], record, None, signal_delay_s=90).cause == intr.SIGNALLED
    near = {**record, "RunTime": "00:08:40"}  # 80 s left, the warning asked for 90 s
    found = intr.classify(["SIGUSR2"], near, None, signal_delay_s=90)
    assert found.cause == intr.TIMEOUT and "80s" in found.detail and found.needs_self_requeue


def test_requeue_and_cancel_look_alike_in_jobstate() -> None:
    # Both are COMPLETING with SIGTERM; the runner tells them apart by the restart count (test below).
    for line in (REQUEUED, CANCELLED):
        assert intr.classify(["SIGTERM"], parse_scontrol_record(line), None, 90).cause == intr.REQUEUED
    assert intr.classify(
        ["SIGTERM"], {**parse_scontrol_record(CANCELLED), "JobState": "CANCELLED"}, None, 90
    ).cause == (intr.CANCELLED)
    assert intr.classify(["SIGTERM"], None, None, 90).cause == intr.TERMINATED


@pytest.mark.parametrize(
    "sacct_state, cause",
    [("PREEMPTED", "preempted"), ("TIMEOUT", "timeout"), ("CANCELLED by 0", "cancelled"), ("NODE_FAIL", "node_fail"),
     ("REQUEUED", "requeued"), ("COMPLETED", None)],
)  # fmt: skip
def test_cause_from_accounting(sacct_state: str, cause: str | None) -> None:
    assert intr.cause_from_accounting(sacct_state) == cause


def test_preemptions_never_use_the_timeout_budget() -> None:
    policy = intr.RequeuePolicy(max_requeues=10, max_timeouts=2)
    assert policy.refusal(["preempted"] * 9) is None
    assert policy.refusal(["preempted"] * 8 + ["timeout", "timeout"]) is None
    refusal = policy.refusal(["preempted", "timeout", "timeout", "timeout"])
    assert refusal is not None and "max_timeouts=2" in refusal
    refusal = policy.refusal(["preempted"] * 11)
    assert refusal is not None and "max_requeues=10" in refusal
    assert policy.refusal(["error", "cancelled"] * 10) is None  # not requeues


def test_crashes_and_stalls_have_their_own_budget_that_preemptions_and_time_limits_never_use() -> None:
    policy = intr.RequeuePolicy(max_requeues=100, max_timeouts=20, max_crashes=2)
    assert policy.refusal(["crashed", "stalled"] + ["preempted", "timeout", "node_fail"] * 5) is None
    refusal = policy.refusal(["crashed", "preempted", "stalled", "crashed"])
    assert refusal is not None and "3 crashed or stalled attempts exceed max_crashes=2" in refusal


@pytest.mark.parametrize(
    "message",
    [
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:35517: "
        "Connection reset by peer. This is typically caused by a remote worker hanging",
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation",
        "DataLoader worker (pid 3675) is killed by signal: Killed. ",
        "DataLoader worker (pid(s) 5818, 5819) exited unexpectedly",
        "DataLoader worker 1 (pid 5818) was killed by signal SIGKILL (the out-of-memory killer sends it)",
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error, NCCL version 2.21.5",
    ],
)
def test_what_a_rank_sees_when_a_process_of_its_job_died_is_a_crash(message: str) -> None:
    assert intr.crash_symptom(RuntimeError(message)) == f"RuntimeError: {message}".strip()


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("model.img_size=31 is not a multiple of model.patch_size=4"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x64 and 32x64)"),
        FileNotFoundError("/data/train/class_00/img_0001.jpg"),
    ],
)
def test_a_bug_or_bad_input_is_not_a_crash(exc: Exception) -> None:
    assert intr.crash_symptom(exc) is None


def test_rendezvous_is_stable_across_attempts() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "node[1-2]"}  # fmt: skip
    first = detect_place(env)
    again = detect_place({**env, "SLURM_RESTART_COUNT": "3"})
    assert first == again
    assert (first.rank, first.world_size, first.master_addr) == (1, 2, "node1")
    assert first.master_port == port_for_job("4242") == 20000 + 4242
    assert first_hostname("gpu[007-010,12],cpu1") == "gpu007" and first_hostname("node2") == "node2"
    assert detect_place({}).scheduler == "single"
