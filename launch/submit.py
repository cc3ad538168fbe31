"""The submitting commands: pretrain, linprobe, fastprobe, finetune and pipeline.

Each one composes and validates the config, checks the experiment folder belongs to it, plans what is
missing, and then prints (--dry-run), submits to SLURM, or runs the jobs locally.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from extrema.tasks import PRETRAIN
from jobs.manifest import job_entries
from launch.commands import PIPELINE
from launch.config.compose import load_launch_config
from launch.config.schema import LaunchConfig
from launch.planning.dag import build_dag, render_dag
from launch.planning.experiment import Experiment, ExperimentConflict, check_ownership, prepare, read_manifest
from launch.planning.milestones import milestone_evaluations
from launch.planning.plan import SUBMIT, CommandPlan, PlannedJob, plan_jobs
from launch.planning.validate import validate
from launch.reporting.jobstate import current_views

log = logging.getLogger(__name__)


@dataclass
class CommandResult:
    """What a submitting command did: its plan and the SLURM ids it got (empty for local runs)."""

    experiment: Experiment
    planned: list[PlannedJob]
    submitted: dict[str, str]
    exit_code: int = 0


def plan_command(command: str, cfg: LaunchConfig) -> CommandPlan:
    """Validate everything and decide what to submit; queues nothing and writes nothing in the experiment
    (milestone evaluations scan the pretraining data, which fills its file-list cache as the job would).

    The stages: the config's job graph (`build_dag`), checked (`validate`, which adds the milestone evaluations
    once the config passed the checks their schedule needs), then planned against the manifest, read once."""
    exp = Experiment.of(cfg)
    milestones = None
    if command == PIPELINE and cfg.pipeline.eval_every_steps:
        milestones = functools.partial(milestone_evaluations, cfg, exp)
    nodes = validate(cfg, build_dag(cfg, command, exp), exp.run_dir(PRETRAIN), then=milestones)
    recorded = read_manifest(exp)
    amended = check_ownership(exp, cfg, recorded)
    entries = job_entries(recorded)
    views, _ = current_views(entries)
    plan = CommandPlan(exp, plan_jobs(nodes, entries, views, exp, cfg.cluster), entries, views)
    check_amendable_now(amended, plan.jobs, exp)
    return plan


def check_amendable_now(amended: list[str], planned: list[PlannedJob], exp: Experiment) -> None:
    """An amendment must reach a job through its next submission: none may be queued, running or done."""
    tasks = {key.partition(".")[0] for key in amended}
    blocked = [f"{p.node.name} ({p.why})" for p in planned if p.node.task in tasks and p.action != SUBMIT]
    planned_tasks = {p.node.task for p in planned}
    blocked += [f"{task} (this command submits no {task} job)" for task in sorted(tasks - planned_tasks)]
    if blocked:
        jobs = ", ".join(blocked)
        raise ExperimentConflict(
            f"pipeline.amend changes {', '.join(amended)}, but these jobs would keep their old values: {jobs}. "
            f"Amend only jobs that will run again: cancel queued or running ones first "
            f"(python -m launch cancel {exp.dir}); completed ones keep the results of their settings."
        )


def run_command(
    command: str, overrides: list[str], dry_run: bool = False, console: Console | None = None
) -> CommandResult:
    """`python -m launch <command> [overrides]`."""
    console = console or Console()
    cfg = load_launch_config(overrides)
    return run_with_config(command, cfg, dry_run, console)


def run_with_config(command: str, cfg: LaunchConfig, dry_run: bool, console: Console) -> CommandResult:
    """The command for an already built config (sweep members come here)."""
    plan = plan_command(command, cfg)
    exp, planned = plan.experiment, plan.jobs
    show_plan(console, exp, cfg, planned)
    if dry_run:
        show_dry_run(console, exp, cfg, planned)
        return CommandResult(exp, planned, {})
    if not plan.to_submit:
        console.print(f"[green]nothing to submit[/]: every job of {escape(str(exp.dir))} is done or already queued")
        return CommandResult(exp, planned, {})
    if cfg.cluster.backend == "slurm":
        from launch.backends.slurm import check_with_sbatch, submit_planned

        check_with_sbatch(exp, cfg, plan)
        prepare(exp, cfg)
        submitted = submit_planned(exp, cfg, plan)
        for name, job_id in submitted.items():
            console.print(f"submitted [bold]{name}[/] as SLURM job {job_id}")
        console.print(escape(f"follow it with: python -m launch status {exp.dir}"))
        return CommandResult(exp, planned, submitted)
    from launch.backends.local import run_planned

    prepare(exp, cfg)
    code = run_planned(exp, cfg, planned)
    return CommandResult(exp, planned, {}, code)


def show_plan(console: Console, exp: Experiment, cfg: LaunchConfig, planned: list[PlannedJob]) -> None:
    console.out(f"{cfg.name} -> {exp.dir} ({cfg.cluster.backend})", highlight=False)
    table = Table()
    for column in ("job", "task", "after", "action", "why"):
        table.add_column(column)
    for p in planned:
        colour = {"submit": "yellow", "keep": "cyan", "done": "green"}[p.action]
        cells = (p.node.name, p.node.task, ",".join(p.node.depends_on))
        table.add_row(*map(escape, cells), f"[{colour}]{p.action}[/]", escape(p.why))
    console.print(table)


def show_dry_run(console: Console, exp: Experiment, cfg: LaunchConfig, planned: list[PlannedJob]) -> None:
    """Print the DAG and, for SLURM, every batch script with the sbatch line that would submit it."""
    console.print("[bold]DAG[/]")
    console.out(render_dag([p.node for p in planned]), highlight=False)
    if cfg.cluster.backend != "slurm":
        console.print("(local backend: the jobs run one after the other on this machine)")
        return
    from launch.backends.sbatch import batch_script

    for p in planned:
        if p.action != SUBMIT:
            continue
        after = [f"<{d} job id>" for d in p.after]
        script = exp.submitit_dir(p.node.name) / "<job id>_submission.sh"
        console.out(f"\n# ---- {p.node.name}: submitit submits {script}:", highlight=False)
        console.out(batch_script(p.node, cfg.cluster, exp, after, p.spec), highlight=False, end="")
