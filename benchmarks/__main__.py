"""`python -m benchmarks` (= `make bench`): run the suite, write bench-results/*.jsonl and summary.md.

python -m benchmarks                       # the full suite (~5-8 min on a quiet 2-core CPU)
python -m benchmarks --quick               # vit_small only, fewer repeats (smoke run of the real sizes)
python -m benchmarks --tiny                # vit_nano at 32 px: plumbing check in seconds
python -m benchmarks --only pretrain_step --only matmul
python -m benchmarks --device cuda --only matmul --only pretrain_step --only input_pipeline --compile   # GPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.suite import BENCHMARKS, PROFILES, run_suite


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="vit_small only, fewer repeats")
    size.add_argument("--tiny", action="store_true", help="vit_nano at 32 px (plumbing check; numbers meaningless)")
    p.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these benchmarks (repeatable)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder (default: bench-results)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of every CPU measurement (default: all cores)"
    )
    p.add_argument("--scratch-dir", default=None, help="where checkpoints are written (default: system temp)")
    p.add_argument("--compile", action="store_true", help="also time every step case with torch.compile")
    p.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="model benchmarks on these devices only"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = PROFILES[profile](args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)  # this process's own measurements (matmul table, device colour)
    cfg.scratch_dir = args.scratch_dir
    if args.device != "all":
        cfg.devices = [args.device]
    if args.compile:
        cfg.step_cases += [dataclasses.replace(c, compile=True) for c in cfg.step_cases]
    command = "python -m benchmarks " + shlex.join(argv)
    summary = run_suite(cfg, args.out, set(args.only) if args.only else None, command.strip())
    print(summary.read_text())
    print(f"\nresults: {args.out}/*.jsonl, summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
