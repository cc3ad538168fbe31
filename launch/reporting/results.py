"""`python -m launch results [ROOT]`: every experiment under a root in one table with the published
columns (name, pretrain data, epochs, masking, color-aug, wall time, linear, finetune) plus GPU-hours,
requeues, kNN, the fast probe's estimate of the linear probe ("linear (fast est.)"), how many times
the experiment's settings were amended (`pipeline.amend=true`: its runs then mixed settings; `status`
lists the changes), and the pretraining's global batch with how its attempts split it ("batch":
`2048 (16x1x128; 8x2x128)` = ranks x accumulation micro-steps x images per micro-step, one entry per change
between attempts). Writes Markdown and CSV and prints a rich table.

A metric that does not exist (an evaluation that has not run or failed) is shown as missing ("-"),
never as 0. Wall time sums every attempt of the pretraining job. Evaluations of milestone checkpoints
(`pipeline.eval_every_steps`) add one row per step below their experiment's, named `<experiment>@step<N>`,
with the evaluation columns filled and the pretraining's time, requeues and batch left missing (they are the row
above).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from extrema.tasks import EVALUATIONS, FASTPROBE, FINETUNE, LINPROBE, PRETRAIN
from jobs.manifest import JobEntry, Manifest, job_entries
from launch.planning.milestones import parse_milestone_job
from launch.reporting.progress import read_final_metrics
from launch.reporting.status import JobStatus, batch_split, collect, find_experiments, format_duration

MISSING = "-"
KNN = "knn"
ACCURACY_HEADINGS = {LINPROBE: "linear", FINETUNE: "finetune", KNN: "kNN", FASTPROBE: "linear (fast est.)"}
"""The accuracy columns: ResultRow field (the evaluation's task name; kNN is the fast probe's) -> heading."""
COLUMNS = (
    "experiment", "name", "pretrain data", "epochs", "masking", "color-aug", "wall time",
    ACCURACY_HEADINGS[LINPROBE], ACCURACY_HEADINGS[FINETUNE], "GPU-hours", "requeues",
    ACCURACY_HEADINGS[KNN], ACCURACY_HEADINGS[FASTPROBE], "amended", "batch",
)  # fmt: skip
_MODEL_NAMES = {"vit_tiny": "ViT-Tiny", "vit_small": "ViT-Small", "vit_base": "ViT-Base", "vit_large": "ViT-Large"}


@dataclass
class ResultRow:
    """One experiment's line of the table; None = missing."""

    experiment: str
    name: str
    pretrain_data: str | None
    epochs: int | None
    masking: str | None
    color_aug: str | None
    wall_time_s: float | None
    """Seconds, summed over every attempt of the pretraining job."""
    linprobe: float | None
    finetune: float | None
    gpu_hours: float | None
    requeues: int | None
    knn: float | None
    fastprobe: float | None
    """The fast probe's estimate of the linear probe."""
    step: int | None = None
    """Pretraining step of the evaluated milestone checkpoint; None = the final checkpoint."""
    amendments: int = 0
    """How many commands changed the experiment's settings under `pipeline.amend=true`."""
    batch: str | None = None
    """The pretraining's global batch and its attempts' splits (`batch_summary`); None = no attempt recorded one."""

    def cells(self) -> list[str]:
        """The row as text, in COLUMNS order."""

        def num(value: float | None, fmt: str) -> str:
            return MISSING if value is None else format(value, fmt)

        return [
            self.experiment if self.step is None else f"{self.experiment}@step{self.step}",
            self.name,
            self.pretrain_data or MISSING,
            MISSING if self.epochs is None else str(self.epochs),
            self.masking or MISSING,
            self.color_aug or MISSING,
            MISSING if self.wall_time_s is None else format_duration(self.wall_time_s),
            num(self.linprobe, ".1f"),
            num(self.finetune, ".1f"),
            num(self.gpu_hours, ".2f"),
            MISSING if self.requeues is None else str(self.requeues),
            num(self.knn, ".1f"),
            num(self.fastprobe, ".1f"),
            str(self.amendments),
            self.batch or MISSING,
        ]


def _top1(metrics: dict | None, *path: str) -> float | None:
    node = (metrics or {}).get("results")
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) else None


def _evaluation_columns(records: dict[str, dict | None]) -> dict:
    """The accuracy columns of a row, from the evaluations' metrics.json records by task name (absent or None =
    not run)."""
    fastprobe = records.get(FASTPROBE)
    return {
        LINPROBE: _top1(records.get(LINPROBE), "top1"),
        FINETUNE: _top1(records.get(FINETUNE), "top1"),
        KNN: _top1(fastprobe, "knn", "top1"),
        FASTPROBE: _top1(fastprobe, "top1"),
    }


def experiment_row(experiment_dir: Path, data: dict | None = None) -> ResultRow:
    """Collate one experiment: its config from the manifest (`data`, read here when not given), metrics from
    its run folders, time from SLURM."""
    data = Manifest(experiment_dir).read() if data is None else data
    config = data.get("config", {})
    pre = config.get(PRETRAIN, {})
    mask = pre.get("mask", {})
    jobs = job_entries(data)
    statuses, _ = collect(experiment_dir)
    by_name: dict[str, JobStatus] = {s.name: s for s in statuses}

    def metrics(job: str) -> dict | None:
        entry = jobs.get(job)
        return read_final_metrics(experiment_dir / entry.run_dir) if entry else None

    pretrain_status = by_name.get(PRETRAIN)
    pretrain_metrics = metrics(PRETRAIN)
    wall_s = pretrain_status.elapsed_s if pretrain_status and pretrain_status.elapsed_s else None
    if wall_s is None and pretrain_metrics:
        wall_s = pretrain_metrics.get("wall_time_s")
    pretrain = jobs.get(PRETRAIN)
    gpus = (pretrain.nodes or 1) * (pretrain.gpus_per_node or 0) if pretrain else 0
    ratio, count = mask.get("ratio"), mask.get("num_masks")
    if pretrain is None:  # evaluations of weights from elsewhere (a random init, a reference file):
        pre, ratio, count = {"model": pre.get("model", {})}, None, None  # the preset's recipe did not run here
    return ResultRow(
        experiment=data.get("name", experiment_dir.name),
        name=_MODEL_NAMES.get(pre.get("model", {}).get("arch"), pre.get("model", {}).get("arch") or MISSING),
        pretrain_data=pre.get("data", {}).get("name"),
        epochs=pre.get("optim", {}).get("epochs"),
        masking=None if ratio is None or count is None else f"{round(100 * ratio)}%x{count}",
        color_aug=None if "augmentation" not in pre else ("yes" if pre["augmentation"] == "color" else "no"),
        wall_time_s=wall_s,
        gpu_hours=None if wall_s is None else wall_s / 3600 * gpus,
        requeues=pretrain_status.requeues if pretrain_status else None,
        amendments=len(data.get("amendments", [])),
        batch=batch_summary(pretrain_status.attempts) if pretrain_status else None,
        **_evaluation_columns({task: metrics(task) for task in EVALUATIONS}),
    )


def batch_summary(attempts: list[dict]) -> str | None:
    """`2048 (16x1x128; 8x2x128)`: the global batch and each split (ranks x micro-steps x micro-batch) in the
    order the attempts ran it, a split repeated by the next attempt shown once; `2048 (16x1x128)` when all agree.
    Attempts without a record (begun before their trainer was built, or by an older version) are skipped;
    None when none has one."""
    plans = [a["batch"] for a in attempts if a.get("batch")]
    runs: list[dict] = [p for i, p in enumerate(plans) if i == 0 or p != plans[i - 1]]
    if not runs:
        return None
    if len({p["global_batch"] for p in runs}) > 1:  # the global batch is not amendable; show it if it happened
        return "; ".join(f"{p['global_batch']} ({batch_split(p)})" for p in runs)
    return f"{runs[0]['global_batch']} ({'; '.join(batch_split(p) for p in runs)})"


def milestone_rows(experiment_dir: Path, final: ResultRow, jobs: dict[str, JobEntry]) -> list[ResultRow]:
    """One row per evaluated milestone step (oldest first); `final` is the experiment's main row, `jobs` its
    manifest's job entries."""
    by_step: dict[int, dict[str, dict | None]] = {}
    for job, entry in jobs.items():
        parsed = parse_milestone_job(job)
        if parsed:
            task, step = parsed
            by_step.setdefault(step, {})[task] = read_final_metrics(experiment_dir / entry.run_dir)
    rows = []
    for step in sorted(by_step):
        columns = _evaluation_columns(by_step[step])
        rows.append(
            dataclasses.replace(
                final, step=step, wall_time_s=None, gpu_hours=None, requeues=None, batch=None, **columns
            )
        )
    return rows


def collate(root: Path) -> list[ResultRow]:
    """One row per experiment under `root`, each followed by the rows of its milestone evaluations."""
    rows = []
    for experiment_dir in find_experiments(root):
        data = Manifest(experiment_dir).read()
        final = experiment_row(experiment_dir, data)
        rows += [final, *milestone_rows(experiment_dir, final, job_entries(data))]
    return rows


def markdown_table(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table of text cells."""
    md = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    md += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(md) + "\n"


def csv_table(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """The same table as CSV."""
    out = io.StringIO()
    csv.writer(out).writerows([columns, *lines])
    return out.getvalue()


def to_markdown(rows: list[ResultRow]) -> str:
    return markdown_table(COLUMNS, [r.cells() for r in rows])


def to_csv(rows: list[ResultRow]) -> str:
    return csv_table(COLUMNS, [r.cells() for r in rows])


def to_rich(rows: list[ResultRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ACCURACY_HEADINGS.values() else "left")
    for r in rows:
        table.add_row(*map(escape, r.cells()))  # names and paths are the user's text, never markup
    return table


def write_results(root: Path, out_dir: Path, console: Console) -> list[ResultRow]:
    """Collate, print, and write results.md + results.csv into `out_dir`.

    A root without experiments is an error, so that a mistyped root never replaces a table with an empty one.
    """
    if not root.is_dir() or not find_experiments(root):
        raise FileNotFoundError(
            f"no experiment (manifest.json) under {root}: give the root that holds the experiment folders "
            "(nothing was written)"
        )
    rows = collate(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(to_markdown(rows))
    (out_dir / "results.csv").write_text(to_csv(rows))
    console.print(to_rich(rows, escape(f"results under {root}")))
    console.print(escape(f"written: {out_dir / 'results.md'}, {out_dir / 'results.csv'}"))
    return rows
