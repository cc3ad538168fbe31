"""The launcher's typed config tree, registered in Hydra's ConfigStore.

The YAML under configs/ only composes and overrides these dataclasses, so Hydra rejects an unknown key
or a wrong type the moment a command is typed. The task sections are the core package's own configs
(`extrema.config`); the cluster and pipeline sections are the launcher's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from extrema.config import FastProbeConfig, FinetuneConfig, LinearProbeConfig, PretrainConfig
from extrema.config.common import check_choice, check_positive
from extrema.tasks import EVALUATIONS, FASTPROBE, TASK_NAMES
from jobs.spec import JobSpec
from launch.backends.script_safety import (
    check_env,
    check_no_control,
    check_one_token,
    check_path_component,
    check_sbatch_extra,
)

BACKENDS = ("local", "slurm")
LOCAL_EXECUTORS = ("submitit", "inprocess")


@dataclass
class DatasetConfig:
    """An image dataset in ImageFolder layout, referenced by the task sections through interpolation."""

    root: str = "data/imagenet"
    """Folder holding train/<class>/<images> and val/<class>/<images>."""
    name: str = "imagenet-1k"
    """Name shown in the results table."""


@dataclass
class ClusterConfig:
    """Where and with what resources jobs run."""

    backend: str = "local"
    """local (this machine) or slurm (sbatch)."""
    executor: str = "submitit"
    """Local backend: submitit (each job in its own processes via submitit's LocalExecutor) or inprocess."""
    partition: str | None = None
    """SLURM partition; None = the cluster's default."""
    account: str | None = None
    """SLURM account to charge."""
    qos: str | None = None
    """SLURM quality of service."""
    nodes: int = 1
    """Nodes of the pretraining job."""
    tasks_per_node: int | None = 1
    """Processes (ranks) per node, at most one per GPU on GPU nodes; None = one per GPU (1 on a CPU job)."""
    gpus_per_node: int | None = 0
    """GPUs per node (`--gpus-per-node`); 0 = CPU job. None (local backend only, its default) = every GPU this
    machine shows (CUDA_VISIBLE_DEVICES applies) when a task may train on one (run.device auto or cuda), else 0."""
    cpus_per_task: int = 8
    """CPU cores per rank (data-loading workers + the main process)."""
    mem: str | None = None
    """Memory per node as sbatch takes it (`64G`; `0` = all of it); None = the cluster's default."""
    time_limit_min: int = 4320
    """Time limit of each attempt in minutes; the job saves and requeues itself before it."""
    constraint: str | None = None
    """Node features (`--constraint`), e.g. a GPU type."""
    signal_delay_s: int = JobSpec.signal_delay_s
    """USR2 comes this many seconds before the time limit (`--signal=USR2@N`): time to finish a step and save."""
    max_requeues: int = JobSpec.max_requeues
    """Requeues of any cause before a job is failed (guards against loops)."""
    max_timeouts: int = JobSpec.max_timeouts
    """Requeues at the time limit before a job is failed; preemptions never count."""
    max_crashes: int = JobSpec.max_crashes
    """Requeues after a crashed rank (killed by a signal, out of memory, lost its peer) or a stalled attempt
    before a job is failed; preemptions and time limits never count."""
    eval_nodes: int = 1
    """Nodes of each evaluation job."""
    eval_time_limit_min: int = 1440
    """Time limit of each evaluation attempt in minutes."""
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    """More sbatch options, `{option: value}` -> `#SBATCH --option=value` (empty value: `--option`)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job step (`module load ...`, `source venv/bin/activate`)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of every rank (e.g. NCCL or GLOO settings)."""
    python: str | None = None
    """Python interpreter on the nodes; None = the one running the launcher."""
    step_pause_s: float = JobSpec.step_pause_s
    """Test knob: every rank sleeps this long at each step boundary (lets tests interrupt a toy run mid-way)."""

    def __post_init__(self) -> None:
        check_choice("cluster.backend", self.backend, BACKENDS)
        check_choice("cluster.executor", self.executor, LOCAL_EXECUTORS)
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_limit_min", "eval_nodes"):
            if getattr(self, name) is not None:
                check_positive(f"cluster.{name}", getattr(self, name))
        if self.gpus_per_node is None and self.backend != "local":
            raise ValueError(
                "cluster.gpus_per_node=null (every GPU this machine shows) only works with cluster.backend=local; "
                "give the GPUs per node of the partition, e.g. cluster.gpus_per_node=8 (0 for a CPU job)"
            )
        if self.gpus_per_node is not None:
            check_positive("cluster.gpus_per_node", self.gpus_per_node, allow_zero=True)
            self._resolve_tasks()
        for name in ("signal_delay_s", "max_requeues", "max_timeouts", "max_crashes", "step_pause_s"):
            check_positive(f"cluster.{name}", getattr(self, name), allow_zero=True)
        check_positive("cluster.eval_time_limit_min", self.eval_time_limit_min)
        # Values that reach the batch script or an #SBATCH line (launch.backends.script_safety).
        for name in ("partition", "account", "qos", "mem", "constraint"):
            value = getattr(self, name)
            if value is not None:
                check_one_token(f"cluster.{name}", str(value))
        check_sbatch_extra(self.sbatch_extra)
        check_env(self.env)
        if self.python is not None:
            check_no_control("cluster.python", self.python)
        if self.signal_delay_s >= 60 * self.time_limit_min:
            raise ValueError(
                f"cluster.signal_delay_s={self.signal_delay_s} is not shorter than cluster.time_limit_min="
                f"{self.time_limit_min} minutes: the job would be warned before it starts"
            )

    def resolve_gpus(self, wants_gpu: bool) -> None:
        """Settle gpus_per_node=None (local): the GPUs this machine shows if a task may use one, else 0."""
        if self.gpus_per_node is None:
            self.gpus_per_node = visible_gpu_count() if wants_gpu else 0
            self._resolve_tasks()

    def _resolve_tasks(self) -> None:
        if self.tasks_per_node is None:
            self.tasks_per_node = max(1, self.gpus_per_node or 0)  # one rank per GPU

    @property
    def ranks(self) -> int:
        """Ranks of the pretraining job."""
        return self.nodes * self.tasks_per_node

    @property
    def eval_ranks(self) -> int:
        """Ranks of each evaluation job."""
        return self.eval_nodes * self.tasks_per_node


@dataclass
class PipelineConfig:
    """What `pipeline` submits after pretraining."""

    evaluations: list[str] = field(default_factory=lambda: list(EVALUATIONS))
    """Evaluations of the final checkpoint, each its own job that starts when pretraining succeeded."""
    eval_every_steps: int | None = None
    """Also evaluate the milestone checkpoints at every multiple of this step before the final one: one job per
    milestone and evaluation (afterok on pretraining). A multiple of pretrain.run.save_every_steps; sets
    pretrain.run.keep_every_steps so pruning spares them. None = the final checkpoint only."""
    milestone_evaluations: list[str] = field(default_factory=lambda: [FASTPROBE])
    """Evaluations of each milestone checkpoint (fastprobe includes kNN; linprobe and finetune cost as much
    as the final ones)."""
    amend: bool = False
    """Let this command change an existing experiment's learning rates, clip_grad, precision, logging/saving
    cadence, accum_steps or run.max_micro_batch (never a global batch): jobs that are submitted again resume
    from their checkpoints with the new values (e.g. after TrainingDiverged, or on GPUs with less memory), and
    the manifest records the change. Refused while an affected job is queued or running, or when it already
    completed. The cluster's size (cluster.nodes, tasks_per_node, gpus_per_node) is not part of the experiment:
    it may change between submissions without this flag."""

    def __post_init__(self) -> None:
        for key in ("evaluations", "milestone_evaluations"):
            names = getattr(self, key)
            for name in names:
                check_choice(f"pipeline.{key}[]", name, EVALUATIONS)
            if len(set(names)) != len(names):
                raise ValueError(f"pipeline.{key}={names} lists an evaluation twice")
        if self.eval_every_steps is not None:
            check_positive("pipeline.eval_every_steps", self.eval_every_steps)


@dataclass
class LaunchConfig:
    """Everything one command needs: the experiment (tasks + data), where it runs, what the pipeline holds."""

    name: str = "???"
    """Experiment name: its folder is `<root>/<name>`."""
    root: str = "experiments"
    """Folder holding every experiment."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Pretraining data."""
    eval_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Data of the evaluations (ImageNet-1K for every published model)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    linprobe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    fastprobe: FastProbeConfig = field(default_factory=FastProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        check_path_component("name", self.name)  # the experiment's folder and its jobs' names
        check_no_control("root", self.root)
        # Settled here, where the tasks' devices are known: a CPU preset on a GPU workstation stays one CPU rank.
        self.cluster.resolve_gpus(any(self.task_config(t).run.device != "cpu" for t in TASK_NAMES))
        every = self.pipeline.eval_every_steps
        if every is None:
            return
        run = self.pretrain.run
        if every % run.save_every_steps:
            raise ValueError(
                f"pipeline.eval_every_steps={every} is not a multiple of pretrain.run.save_every_steps="
                f"{run.save_every_steps}: pretraining saves no checkpoint at those steps; use a multiple, e.g. "
                f"pipeline.eval_every_steps={max(1, every // run.save_every_steps) * run.save_every_steps}"
            )
        if run.keep_every_steps is None:
            # Milestones must survive keep_last pruning until their evaluations have read them. Set here, in
            # the pretraining config, so every command of the experiment sees the same value (its identity).
            run.keep_every_steps = every
        elif every % run.keep_every_steps:
            raise ValueError(
                f"pipeline.eval_every_steps={every} is not a multiple of pretrain.run.keep_every_steps="
                f"{run.keep_every_steps}: those checkpoints would be pruned before they are evaluated; "
                f"drop pretrain.run.keep_every_steps (it defaults to pipeline.eval_every_steps) or use a multiple"
            )

    def task_config(self, task: str):
        """The typed config of one task (a name of extrema.tasks: its section here has that name)."""
        return getattr(self, task)


def visible_gpu_count() -> int:
    """CUDA devices this process can see (0 without CUDA); does not initialise CUDA in the launcher."""
    import torch

    return torch.cuda.device_count()


SCHEMA_NAME = "launch_schema"


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (configs/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=LaunchConfig)
