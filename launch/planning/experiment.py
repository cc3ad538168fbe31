"""An experiment folder: its layout, its identity (the config it was made for) and its task configs.

<root>/<name>/
    manifest.json         the launcher's record: config, jobs, ids, submissions (jobs.manifest)
    records/<job>.json    each job's own record: attempts, states (jobs.manifest)
    config.yaml           the full resolved launcher config of the last command
    jobs/<job>.yaml       the typed config each job runs
    jobs/<job>.submission-<k>.json   the job spec of its k-th submission (`python -m jobs.run <that file>`)
    submitit/<job>/       submitit's folder of each SLURM job: <id>_submission.sh (its batch script),
                          <id>_submitted.pkl, <id>_<task>_result.pkl, <id>_<task>_log.out|err (appended
                          across requeues)
    logs/submitit/        submitit's folder of the local jobs
    <job>/                run folder of each job (checkpoints/, metrics.jsonl, metrics.json)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from jobs.config_io import save_config
from jobs.manifest import Manifest, now_iso
from jobs.runner import JobSpec
from launch.config.schema import ClusterConfig, LaunchConfig

# Keys that say where and how a run executes, not what it computes: changing them keeps the experiment. The
# cluster's size is among them: a job resumes on another number of ranks with the same global batch, its sampler
# at the saved global position (pretraining with the same per-image draws; evaluations re-seed their streams).
_NOT_IDENTITY = ("name", "root", "cluster", "pipeline")
# Settings a job may take up when it resumes without changing what its checkpoints hold: learning rates,
# clipping, precision, the logging and saving cadence, and how a rank splits its share of the global batch
# into micro-steps (the global batch, optim.batch_size / batch_size, fixes the schedule and stays fixed)
# (`<task>.<leaf>`, `<task>.optim.<leaf>` or `<task>.run.<leaf>`). They change only with
# `pipeline.amend=true`, e.g. to continue a diverged run, or on GPUs with less memory.
AMENDABLE_LEAVES = (
    "base_lr",
    "min_lr",
    "clip_grad",
    "precision",
    "log_every_steps",
    "save_every_steps",
    "keep_last",
    "accum_steps",
    "max_micro_batch",
)


class ExperimentConflict(ValueError):
    """The output folder belongs to an experiment with a different config."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Paths of one experiment folder."""

    dir: Path

    @classmethod
    def of(cls, cfg: LaunchConfig) -> Experiment:
        return cls(Path(cfg.root).resolve() / cfg.name)

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.dir)

    def run_dir(self, job: str) -> Path:
        return self.dir / job

    def job_config(self, job: str) -> Path:
        return self.dir / "jobs" / f"{job}.yaml"

    def job_spec_file(self, spec: JobSpec) -> Path:
        """Where a submission's spec lives: one file per submission, so that the batch shell of an earlier one,
        still ending, reads its own."""
        return self.dir / "jobs" / f"{spec.name}.submission-{spec.submission}.json"

    def submitit_dir(self, job: str) -> Path:
        """submitit's folder of a SLURM job: batch scripts, pickles, results and logs of every submission."""
        return self.dir / "submitit" / job


def identity(cfg: LaunchConfig) -> dict[str, Any]:
    """What the experiment computes: the config without the keys of `_NOT_IDENTITY`."""
    full = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(full, dict)
    return {k: v for k, v in full.items() if k not in _NOT_IDENTITY}


def identity_hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    """{dotted key: `key: old -> new`} for every leaf that differs, in key order."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return {k: f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys}


def is_amendable(key: str) -> bool:
    """Whether a dotted config key may change under `pipeline.amend=true` (see AMENDABLE_LEAVES)."""
    _, _, rest = key.partition(".")
    leaf = rest.rsplit(".", 1)[-1]
    return leaf in AMENDABLE_LEAVES and rest in (leaf, f"optim.{leaf}", f"run.{leaf}")


def read_manifest(exp: Experiment) -> dict[str, Any] | None:
    """The experiment's merged manifest (`Manifest.read`), or None when nothing recorded it yet."""
    return exp.manifest.read() if exp.manifest.exists() else None


def check_ownership(exp: Experiment, cfg: LaunchConfig, data: dict[str, Any] | None) -> list[str]:
    """Refuse to reuse a folder made for a different config (its checkpoints would be resumed). `data`: the
    folder's manifest as this command read it (`read_manifest`).

    Returns the dotted keys this command amends: empty, or only amendable ones under `pipeline.amend=true`.
    """
    if not exp.dir.exists():
        return []
    if data is None:
        if any(exp.dir.iterdir()):
            raise ExperimentConflict(
                f"output folder {exp.dir} exists, is not empty and has no manifest.json: it was not made by this "
                f"launcher. Choose another experiment name (name=...) or root (root=...)."
            )
        return []
    new = identity(cfg)
    if data.get("config_hash") == identity_hash(new):
        return []
    differences = config_differences(data.get("config", {}), new)
    fixed = [k for k in differences if not is_amendable(k)]
    if cfg.pipeline.amend and not fixed:
        return list(differences)
    diffs = list(differences.values())
    shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
    hint = ""
    if "pretrain.run.keep_every_steps" in differences:
        hint = (
            "\npipeline.eval_every_steps sets pretrain.run.keep_every_steps: give every command of this experiment "
            "the value it was made with (its pretraining keeps only those milestone checkpoints)."
        )
    if not fixed:
        hint += (
            "\nThese settings may change when jobs resume (e.g. to continue a run that stopped with TrainingDiverged "
            "from its last good checkpoint, or to split the same global batch into other micro-steps): add "
            "pipeline.amend=true."
        )
    elif cfg.pipeline.amend:
        hint += f"\npipeline.amend=true lets only {', '.join(AMENDABLE_LEAVES)} change; not {', '.join(fixed[:6])}."
    raise ExperimentConflict(
        f"output folder {exp.dir} belongs to experiment {data.get('name')!r} with a different config:\n  {shown}\n"
        f"Resuming there would mix runs. Use another name (name={cfg.name}_v2) or root, or delete the folder.{hint}"
    )


def prepare(exp: Experiment, cfg: LaunchConfig) -> None:
    """Create the folder and its manifest header; write the resolved config (call after check_ownership)."""
    (exp.dir / "jobs").mkdir(parents=True, exist_ok=True)
    (exp.dir / "logs").mkdir(parents=True, exist_ok=True)
    ident = identity(cfg)
    ident_hash = identity_hash(ident)
    with exp.manifest.edit() as data:
        if data.get("config") and data.get("config_hash") != ident_hash:  # accepted by check_ownership
            changes = list(config_differences(data["config"], ident).values())
            data.setdefault("amendments", []).append({"time": now_iso(), "changes": changes})
        data.setdefault("name", cfg.name)
        data.setdefault("created", now_iso())
        data["config_hash"] = ident_hash
        data["config"] = ident
        data.setdefault("jobs", {})
    (exp.dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def job_spec(exp: Experiment, name: str, task: str, cluster: ClusterConfig, submission: int) -> JobSpec:
    """The JobSpec of one job's `submission` (its number: the next one after those the manifest records), what
    every backend submits and a dry run shows."""
    return JobSpec(
        task=task,
        config_path=str(exp.job_config(name)),
        run_dir=str(exp.run_dir(name)),
        experiment_dir=str(exp.dir),
        job_name=name,
        submission=submission,
        max_requeues=cluster.max_requeues,
        max_timeouts=cluster.max_timeouts,
        max_crashes=cluster.max_crashes,
        signal_delay_s=cluster.signal_delay_s,
        step_pause_s=cluster.step_pause_s,
    )


def write_job_spec(exp: Experiment, spec: JobSpec) -> Path:
    """Write the spec a submission runs beside its task config; returns the file the job is given."""
    return spec.write(exp.job_spec_file(spec))


def write_job_config(exp: Experiment, job: str, task_cfg: Any) -> Path:
    """Write the typed config a job will run."""
    return save_config(task_cfg, exp.job_config(job))
