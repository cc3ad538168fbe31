"""`python -m launch <command> ...` (and the Make targets that forward to it).

Submitting commands take Hydra overrides; `-m` turns them into a sweep:
    python -m launch pipeline experiment=vitb_80x5_color cluster=slurm cluster.nodes=4 dataset.root=/data/in1k
    python -m launch pipeline --dry-run experiment=tiny cluster=slurm
    python -m launch pipeline -m experiment=tiny pretrain.mask.ratio=0.8,0.9 pretrain.mask.num_masks=5,8
    python -m launch status experiments/tiny        python -m launch results experiments
    python -m launch logs experiments/tiny pretrain  python -m launch cancel experiments/tiny
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from extrema.tasks import FASTPROBE, FINETUNE, LINPROBE, PRETRAIN
from launch.commands import PIPELINE, SUBMIT_COMMANDS

EXIT_USAGE = 2
PIPE_WIDTH = 250


def _folder(text: str) -> Path:
    """A folder argument, given as `PATH` or as `root=PATH` (the form the Make targets' ARGS use)."""
    return Path(text.removeprefix("root="))


def _hydra_cfg_alias(argv: list[str], console: Console) -> list[str]:
    """`COMMAND OVERRIDES --cfg job` (Hydra's way to print the config) is `config OVERRIDES` here."""
    if argv[:1] and argv[0] in SUBMIT_COMMANDS and "--cfg" in argv:
        at = argv.index("--cfg")
        rest = argv[1:at] + argv[at + 2 :]
        console.print("(--cfg: the composed config, as `python -m launch config OVERRIDES` prints it)", highlight=False)
        return ["config", *[a for a in rest if a not in ("--dry-run", "-m", "--multirun")]]
    return argv


def _console() -> Console:
    """The terminal's width, or a wide one in a pipe or a file (rich would squeeze tables into 80 columns)."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=PIPE_WIDTH)
    return console


def _lines(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of lines")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description="ExtreMA jobs on SLURM or this machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        PRETRAIN: "submit a pretraining job",
        LINPROBE: "submit a linear probe of a checkpoint (default: the experiment's pretraining)",
        FASTPROBE: "submit a fast probe + kNN of a checkpoint",
        FINETUNE: "submit a finetune of a checkpoint",
        PIPELINE: "submit pretraining and its evaluations (afterok); submits only what is missing",
    }
    for name in SUBMIT_COMMANDS:
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--dry-run", action="store_true", help="print the DAG and batch scripts, submit nothing")
        p.add_argument("-m", "--multirun", action="store_true", help="sweep over comma-separated override values")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=tiny cluster=slurm")
    p = sub.add_parser("config", help="print the composed config of some overrides, or describe its keys")
    p.add_argument("--describe", metavar="PREFIX", help="each key under PREFIX (e.g. cluster.) with type and meaning")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("status", help="state, attempts and causes of every job of an experiment (or a root)")
    p.add_argument(
        "path", nargs="?", type=_folder, default="experiments", help="experiment folder or root, PATH or root=PATH"
    )
    p = sub.add_parser("results", help="results table of every experiment under a root (Markdown, CSV, rich)")
    p.add_argument("root", nargs="?", type=_folder, default="experiments", help="the root, PATH or root=PATH")
    p.add_argument("--out", help="where to write results.md and results.csv (default: the root)")
    p = sub.add_parser("logs", help="the output of an experiment's jobs")
    p.add_argument("experiment", type=_folder)
    p.add_argument("job", nargs="?")
    p.add_argument("-n", "--lines", type=_lines, default=40, help="last lines of each log (default: 40)")
    p = sub.add_parser("cancel", help="cancel an experiment's pending or running jobs")
    p.add_argument("experiment", type=_folder)
    p.add_argument("jobs", nargs="*")
    # Listed for --help only: `main` hands everything after "demo" to the demo's own parser.
    sub.add_parser("demo", help="run the demo pipeline on built-in data (python -m launch demo --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    console = _console()
    try:
        if argv[:1] == ["demo"]:  # its options (--out, --seeds, overrides) are the demo's to parse
            from launch import demo

            return int(demo.main(argv[1:]) or 0)
        return _dispatch(_parser().parse_args(_hydra_cfg_alias(argv, console)), console)
    except Exception as exc:  # every user-facing failure ends here with its message, not a traceback
        if not _is_user_error(exc):
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # user text is no markup
        return EXIT_USAGE


def _is_user_error(exc: Exception) -> bool:
    from jobs.slurm_cli import SlurmError
    from launch.config.compose import ConfigError
    from launch.planning.experiment import ExperimentConflict
    from launch.planning.validate import ValidationError

    user_errors = (ConfigError, ValidationError, ExperimentConflict, SlurmError, FileNotFoundError, ValueError)
    return isinstance(exc, user_errors)


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command in SUBMIT_COMMANDS:
        if args.multirun:
            from launch.config.sweep import run_sweep

            return run_sweep(args.command, args.overrides, args.dry_run)
        from launch.submit import run_command

        return run_command(args.command, args.overrides, args.dry_run, console).exit_code
    if args.command == "config":
        from omegaconf import OmegaConf

        from launch.config.compose import load_launch_config

        cfg = load_launch_config(args.overrides)
        if args.describe is None:
            console.out(OmegaConf.to_yaml(OmegaConf.structured(cfg)), highlight=False)
            return 0
        from launch.reporting.describe import describe

        rows = describe(cfg, args.describe)
        if not rows:
            raise ValueError(f"no config key starts with {args.describe!r}; try pretrain., cluster. or pipeline.")
        for key, kind, value, meaning in rows:
            console.out(f"{key} ({kind}) = {value!r}\n    {meaning}", highlight=False)
        return 0
    if args.command == "status":
        from launch.reporting.status import show_status

        show_status(args.path, console)
        return 0
    if args.command == "results":
        from launch.reporting.results import write_results

        write_results(args.root, Path(args.out) if args.out else args.root, console)
        return 0
    if args.command == "logs":
        from launch.reporting.logs import show_logs

        show_logs(args.experiment, args.job, args.lines, console)
        return 0
    if args.command == "cancel":
        from launch.cancel import cancel_jobs

        cancel_jobs(args.experiment, args.jobs, console)
        return 0
    raise AssertionError(args.command)
