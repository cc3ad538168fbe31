"""`python -m launch demo` (`make demo`): the whole pipeline on built-in data, on this machine, with a baseline.

1. Writes the procedural image dataset (`extrema.data.synthetic`) into <out>/data, once.
2. Runs `pipeline` of the demo preset (ExtreMA pretraining, then linear probe, fast probe + kNN and finetune
   of its final checkpoint) through the same launcher path as on SLURM, with the local submitit executor.
3. Evaluates the same architecture at its random initialisation with the same evaluation commands, as a
   second experiment: the baseline's weights are the pretraining's own step-0 weights (same seed).
4. Prints the comparison table, writes it as Markdown and CSV, and plots the pretraining loss and the
   accuracies (PNG).

Ctrl-C stops the running job at its next step boundary after a checkpoint; running the demo again resumes
it exactly there. A finished demo run again submits nothing and reports its results.

    python -m launch demo                               # outputs/demo
    python -m launch demo --out /tmp/demo pretrain.run.threads=2   # any Hydra override of the preset
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from extrema.checkpoint import FORMAT, atomic_save, read_checkpoint
from extrema.config import PretrainConfig
from extrema.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from extrema.tasks import FASTPROBE, FINETUNE, LINPROBE, PRETRAIN
from jobs.manifest import Manifest
from launch.commands import PIPELINE
from launch.config.compose import load_launch_config
from launch.reporting.progress import read_log, read_progress
from launch.reporting.results import ACCURACY_HEADINGS, KNN, ResultRow, csv_table, experiment_row, markdown_table
from launch.reporting.status import format_duration
from launch.submit import run_command

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
DEFAULT_OUT = "outputs/demo"

# The data each demo preset runs on. Ten classes, eight textures and two shapes, with random colours,
# periods, phases, positions, sizes and rotations: see extrema/data/synthetic.py for how they are drawn.
DEMO_CLASSES = ("stripes_h", "stripes_v", "checker", "dots", "rings", "grid", "zigzag", "spokes", "annulus", "disk")
DATASETS: dict[str, SyntheticSpec] = {
    "demo": SyntheticSpec(classes=DEMO_CLASSES, train_per_class=1000, val_per_class=200, image_size=32),
    "demo_smoke": SyntheticSpec(classes=DEMO_CLASSES[:4], train_per_class=48, val_per_class=16, image_size=32),
}
# (column, result field) of the comparison; the linear probe is the headline number, spelled out.
METRICS = (("linear probe", LINPROBE), *((ACCURACY_HEADINGS[field], field) for field in (FASTPROBE, KNN, FINETUNE)))


@dataclass
class DemoPaths:
    """Where the demo writes."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def experiments(self) -> Path:
        return self.out / "experiments"

    def random_init(self, experiment: str, seed: int) -> Path:
        """The baseline's weights: one file per experiment name and seed."""
        return self.out / "random_init" / f"{experiment}_seed{seed}.pt"


def main(argv: list[str] | None = None) -> int:
    """Run (or resume, or report) the demo; returns the process exit code."""
    argv = list(argv or [])
    if argv[:1] == ["--"]:  # `python -m launch demo -- --out DIR` (an older spelling) still works
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.preset not in DATASETS:
        raise ValueError(f"--preset {args.preset!r} has no demo dataset; choose one of {sorted(DATASETS)}")
    console = Console()
    if not console.is_terminal:  # CI, a pipe: 80 columns would cut the table's numbers short
        console = Console(width=max(console.width, 120))
    _log_through(console)
    paths = DemoPaths(Path(args.out).resolve())
    try:
        return run_demo(paths, args.preset, args.overrides, console)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/]: run the same command again to resume where it stopped")
        return EXIT_INTERRUPTED


def run_demo(paths: DemoPaths, preset: str, overrides: list[str], console: Console) -> int:
    """The four steps of the module docstring; 0 when the table is complete."""
    with console.status(f"writing the demo dataset to {paths.data} (once)"):
        generate_synthetic_dataset(paths.data, DATASETS[preset])
    common = [f"experiment={preset}", "cluster=local", f"root={paths.experiments}", f"dataset.root={paths.data}"]
    common += overrides
    cfg = load_launch_config(common)
    pretrained = paths.experiments / cfg.name
    baseline_name = f"{cfg.name}_random_init"
    baseline = paths.experiments / baseline_name

    with JobProgress(console, [pretrained, baseline]):
        console.rule(f"[bold]1/2 ExtreMA pretraining and its evaluations[/] ({cfg.name})")
        code = run_command(PIPELINE, common, console=console).exit_code
        if code:
            return _stopped(console, code)
        console.rule("[bold]2/2 the same evaluations of the random initialisation[/]")
        init = write_random_init(cfg.pretrain, paths.random_init(cfg.name, cfg.pretrain.run.seed))
        evaluations = list(cfg.pipeline.evaluations)
        base = [*common, f"name={baseline_name}", *(f"{task}.checkpoint={init}" for task in evaluations)]
        for task in evaluations:
            code = run_command(task, base, console=console).exit_code
            if code:
                return _stopped(console, code)

    rows = {"ExtreMA pretrained": experiment_row(pretrained), "random init": experiment_row(baseline)}
    report(paths.out, rows, pretrained / PRETRAIN, DATASETS[preset], cfg.dataset.name, console)
    return 0


def _stopped(console: Console, code: int) -> int:
    if code == EXIT_INTERRUPTED:
        console.print("[yellow]stopped after a checkpoint[/]: run the same command again to resume exactly there")
    else:
        console.print(f"[red]a job failed[/] (exit {code}); `python -m launch logs <experiment> <job>` shows why")
    return code


def write_random_init(pretrain: PretrainConfig, path: Path) -> Path:
    """The pretraining's step-0 weights (same seed, same architecture) as a checkpoint the evaluations load.

    The baseline then differs from the pretrained backbone by the training alone. Written once; an existing
    file made for another architecture is an error rather than a silently mismatched baseline.
    """
    from extrema.engine.pretrain import initial_model, model_args

    args = model_args(pretrain)
    if path.is_file():
        found = read_checkpoint(path).get("model_args")
        if found != args:
            raise ValueError(f"{path} holds a random init of another model ({found} != {args}); delete it to redo it")
        return path
    model = initial_model(pretrain)
    payload = {
        "format": FORMAT,
        "kind": PRETRAIN,
        "arch": pretrain.model.arch,
        "model_args": args,
        "step": 0,
        "epoch": 0,
        "model": model.state_dict(),
    }
    log.info("random-init baseline weights written to %s", path)
    return atomic_save(payload, path)


# ---- the report ----------------------------------------------------------------------------------------------
def comparison_rows(rows: dict[str, ResultRow]) -> list[list[str]]:
    """One line per backbone, then the gain of pretraining in points; a missing number stays `-`."""
    lines = []
    for label, row in rows.items():
        wall = format_duration(row.wall_time_s) if row.wall_time_s else "-"
        lines.append([label, *(_pct(getattr(row, field)) for _, field in METRICS), wall])
    first, second = rows.values()
    gains = []
    for _, field in METRICS:
        a, b = getattr(first, field), getattr(second, field)
        gains.append("-" if a is None or b is None else f"{a - b:+.1f}")
    lines.append([GAIN, *gains, ""])
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


GAIN = "gain (points)"
COLUMNS = ("backbone", *(name for name, _ in METRICS), "pretraining")


def report(
    out: Path, rows: dict[str, ResultRow], pretrain_run: Path, spec: SyntheticSpec, dataset: str, console: Console
) -> None:
    """Print the table; write results.md, results.csv, pretrain_loss.png and accuracies.png into `out`."""
    lines = comparison_rows(rows)
    title = (
        f"ExtreMA demo: top-1 % on the {spec.val_per_class * len(spec.classes)} validation images of {dataset} "
        f"({len(spec.classes)} classes, chance {100 / len(spec.classes):.0f}%)"
    )
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "backbone" else "right", no_wrap=True)
    for line in lines:
        table.add_row(*line, style="bold" if line[0] == GAIN else None)
    console.print(table)
    (out / "results.md").write_text(title + "\n\n" + markdown_table(COLUMNS, lines))
    (out / "results.csv").write_text(csv_table(COLUMNS, lines))
    plot_loss(read_log(pretrain_run), out / "pretrain_loss.png")
    plot_accuracies(rows, 100 / len(spec.classes), out / "accuracies.png")
    written = ("results.md", "results.csv", "pretrain_loss.png", "accuracies.png")
    console.print("written: " + ", ".join(str(out / name) for name in written))


def plot_loss(records: list[dict], path: Path) -> Path:
    """Pretraining loss per step and, on a second axis, the spread of the teacher's embeddings (0 = collapse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [r for r in records if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in logged], [r["loss"] for r in logged], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pretraining loss", color="tab:blue")
    spread = [r for r in logged if "teacher_std" in r]
    if spread:
        twin = ax.twinx()
        twin.plot([r["step"] for r in spread], [r["teacher_std"] for r in spread], color="tab:orange")
        twin.set_ylabel("teacher embedding spread (collapse check)", color="tab:orange")
        twin.set_ylim(bottom=0)
    ax.set_title("ExtreMA pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracies(rows: dict[str, ResultRow], chance: float, path: Path) -> Path:
    """Grouped bars: each evaluation, pretrained vs random init (missing results are left out), and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for i, (label, row) in enumerate(rows.items()):
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(METRICS))]
        values = [getattr(row, field) for _, field in METRICS]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        bars = ax.bar([x for x, _ in shown], [v for _, v in shown], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.0f}%)")
    ax.set_xticks(range(len(METRICS)), [name for name, _ in METRICS])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 118)  # room above 100 % for the legend row
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncol=3, frameon=False)
    ax.set_title("Pretrained vs random init, same architecture and evaluations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- progress --------------------------------------------------------------------------------------------------
class JobProgress:
    """A live progress bar per job (step / total, loss) read from the run folders while the launcher waits.

    The jobs run in their own processes (submitit) and write their output to log files; this shows what they
    are doing. It only reads files, so it works the same for a resumed job. Where the output is not a terminal
    (CI, `| tee`), where bars are not redrawn, each job instead logs a progress line every `log_every_s`.
    """

    def __init__(
        self, console: Console, experiments: list[Path], period_s: float = 1.0, log_every_s: float = 30.0
    ) -> None:
        self.experiments = experiments
        self.period_s = period_s
        self.log_every_s = log_every_s
        self.live = console.is_terminal
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # job -> (time, step) of its last line
        self.progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            TextColumn("{task.completed:>6.0f}/{task.total:<6.0f}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self._done: set[tuple[str, str]] = set()  # bars at their end: their logs are not read again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-progress", daemon=True)

    def __enter__(self) -> JobProgress:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.refresh()
        self.progress.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.refresh()
            except (OSError, ValueError):  # a file being replaced right now: read it next time
                continue

    def refresh(self) -> None:
        """Add or update one bar per job that has logged a step."""
        for exp in self.experiments:
            if not Manifest(exp).exists():
                continue
            for job, entry in Manifest(exp).read().get("jobs", {}).items():
                key = (exp.name, job)
                if key in self._done:
                    continue
                p = read_progress(exp / entry.get("run_dir", job))
                if p.step is None:
                    continue
                total = p.total_steps or max(p.step, 1)
                info = "" if p.loss is None else f"loss {p.loss:.4f}"
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(f"{exp.name}/{job}", total=total, info=info)
                self.progress.update(self.tasks[key], completed=min(p.step, total), total=total, info=info)
                if not self.live:
                    self._log_line(key, p.step, total, info, p.eta_s)
                if p.total_steps is not None and p.step >= p.total_steps:
                    self._done.add(key)

    def _log_line(self, key: tuple[str, str], step: int, total: int, info: str, eta_s: float | None) -> None:
        last_time, last_step = self._logged.get(key, (0.0, -1))
        now = time.monotonic()
        if step == last_step or (now - last_time < self.log_every_s and step < total):
            return
        self._logged[key] = (now, step)
        eta = f", eta {format_duration(eta_s)}" if eta_s and step < total else ""
        log.info("%s/%s: step %d/%d %s%s", *key, step, total, info, eta)


def _log_through(console: Console) -> None:
    # Log lines go through the console that draws the progress bars, so that they print above them.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    root.setLevel(logging.INFO)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--preset", default="demo", help=f"experiment preset, one of {sorted(DATASETS)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the preset, e.g. pretrain.run.threads=2")
    return parser
