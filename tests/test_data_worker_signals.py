"""Data-loader workers under the signals SLURM and terminals send: to every process of the step or group.

Each case runs in a child process with its own session that signals its whole process group in the
middle of an epoch (what SLURM does on preemption, `scontrol requeue`, `scancel --signal`, and a terminal
does on Ctrl-C): the workers must live on, the loader must hand out every batch of the epoch, the
training process alone must have seen the signal, and the process must still exit (torch and
multiprocessing end workers with SIGTERM at shutdown). A worker killed by SIGKILL (the OOM killer) must be
reported with its pid and signal, and read as a crash rather than a bug.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.interruption import crash_symptom
from tests.image_data import write_image_folder

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, signal, subprocess, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from extrema.data import ImageFolderDataset, ResumableDistributedSampler, build_loader, make_pretrain_transform
from extrema.data.workers import ignore_stop_signals, iterate_workers
from jobs.signals import StopFlag

folder, cases = sys.argv[1], json.loads(sys.argv[2])
flag = StopFlag().install()
report = []
for case in cases:
    flag.received.clear()
    if case["loader"] == "resumable":  # the pretraining loader: persistent workers, optional device colour
        transform = make_pretrain_transform("color", 16, color_on_device=case["device_color"])
        dataset = ImageFolderDataset(folder + "/train", transform, cache_dir=folder + "/cache")
        sampler = ResumableDistributedSampler(len(dataset), 1, 0, seed=1)
        loader = build_loader(dataset, 2, sampler, num_workers=2, seed=1, prefetch_factor=1)
        passes = [iter(loader)]
    else:  # a plain loader (validation, feature cache): workers re-forked on every pass
        data = list(range(12))
        plain = DataLoader(data, batch_size=2, num_workers=2, persistent_workers=case["persistent"],
                           worker_init_fn=ignore_stop_signals)
        passes = [iterate_workers(plain), iterate_workers(plain)]
    batches = 0
    for n, batches_of_pass in enumerate(passes):
        for i, _ in enumerate(batches_of_pass):
            batches += 1
            if n == len(passes) - 1 and i == 1:
                # From another process (as slurmstepd or a shell sends it) to every process of the group.
                subprocess.run(f"kill -s {case['signal'][3:]} -- -{os.getpgid(0)}", shell=True)
                time.sleep(0.3)
    report.append({"batches": batches, "signals": flag.names()})
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", num_classes=2, per_class=6, size=(20, 20))  # 12 files: 6 batches of 2
    return root


def _run_child(folder: Path, cases: list[dict]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), json.dumps(cases)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group, as a job step or a terminal job has
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_stop_signals_to_the_whole_group_leave_the_workers_running(folder: Path) -> None:
    cases = [
        {"loader": "resumable", "signal": sig, "device_color": device_color}
        for sig in ("SIGTERM", "SIGUSR2", "SIGINT")
        for device_color in (False, True)
    ]
    cases += [{"loader": "plain", "signal": "SIGTERM", "persistent": p} for p in (False, True)]
    report = _run_child(folder, cases)
    for case, seen in zip(cases, report, strict=True):
        expected = 6 if case["loader"] == "resumable" else 12  # plain: two passes of 6 batches
        assert seen["batches"] == expected, (case, seen)
        assert seen["signals"] == [case["signal"]], (case, seen)  # the training process saw it, once


KILL_CHILD = r"""
import os, signal
from torch.utils.data import DataLoader, Dataset
from extrema.data.workers import ignore_stop_signals, iterate_workers

class KilledAtThree(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker
        return i

loader = DataLoader(KilledAtThree(), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals)
try:
    for _ in iterate_workers(loader):
        pass
except RuntimeError as exc:
    print("ERROR " + str(exc).splitlines()[0])
"""


def test_a_worker_killed_by_a_signal_is_reported_with_its_pid_and_read_as_a_crash() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILL_CHILD],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next((line for line in proc.stdout.splitlines() if line.startswith("ERROR ")), None)
    assert line is not None, proc.stdout + proc.stderr[-2000:]
    message = line.removeprefix("ERROR ")
    assert re.search(r"worker 0 \(pid \d+\) was killed by signal SIGKILL", message), message
    assert crash_symptom(RuntimeError(message)) is not None
    assert crash_symptom(ValueError("bad value in my transform")) is None
