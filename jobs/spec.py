"""What a job runs (`JobSpec`): the one definition of the values the launcher hands to a node, and of their
defaults. The launcher writes each submission's spec as a file beside the task config
(`jobs/<job>.submission-<k>.json`); the node reads it (`python -m jobs.run SPEC.json`, `CheckpointableJob`).
The launcher's cluster config takes its defaults from here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class JobSpec:
    """What a job runs; everything else (progress, checkpoints) is found in the run folder."""

    task: str
    """pretrain, linprobe, fastprobe or finetune."""
    config_path: str
    """YAML of the task's typed config."""
    run_dir: str
    """The task's run folder (checkpoints/, metrics.jsonl, metrics.json)."""
    experiment_dir: str | None = None
    """Folder of the experiment manifest to record attempts in; None = record nothing."""
    job_name: str | None = None
    """This job's key in the manifest (defaults to the task name)."""
    submission: int = 0
    """Which of the launcher's submissions of this job this is (1, 2, ...): orders the job's records against the
    launcher's (see `jobs.records.StateOrder`). 0: unknown (run by hand); the latest the manifest shows is used."""
    max_requeues: int = 100
    """Requeues of any cause before the job is failed (a guard against loops)."""
    max_timeouts: int = 20
    """Requeues at the time limit before the job is failed; preemptions do not count."""
    max_crashes: int = 3
    """Requeues after a crashed or stalled attempt before the job is failed; preemptions do not count."""
    signal_delay_s: int = 120
    """How long before the time limit SLURM sends USR2 (`--signal=USR2@N`); used to recognise a timeout."""
    step_pause_s: float = 0.0
    """Sleep this long at every step boundary. Only for tests that must interrupt a toy model mid-run."""

    @property
    def name(self) -> str:
        return self.job_name or self.task

    def write(self, path: str | Path) -> Path:
        """Write the spec as JSON (every field); the file is complete before it has its name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> JobSpec:
        """The spec a file holds; a field this version does not know is refused, a missing one takes its default."""
        values = json.loads(Path(path).read_text())
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"job spec {path} has fields this toolkit does not know: {', '.join(unknown)}")
        return cls(**values)
