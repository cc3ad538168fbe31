"""What `make bench` measures, in which sizes, and the run that writes the results.

Profiles: `full` (the issue's configurations: vit_small batch 16 and vit_base batch 8 at 224 px, 80% x 5,
fp32 and bf16, on the CPU and on CUDA when present), `quick` (vit_small only, fewer repeats: a smoke run
of the real sizes) and `tiny` (vit_nano at 32 px: checks the plumbing in seconds; numbers meaningless).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import checkpoint_io, input_pipeline, probes
from benchmarks.machine import load_average, machine_info
from benchmarks.matmul import matmul_gflops
from benchmarks.pretrain_step import StepCase, run_case
from benchmarks.report import render_summary, write_jsonl

log = logging.getLogger(__name__)

BENCHMARKS = ("matmul", "pretrain_step", "input_pipeline", "checkpoint", "probes")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ModelShape:
    """Geometry shared by the model benchmarks."""

    img_size: int = 224
    patch_size: int = 16
    mlp_dim: int = 4096

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SuiteConfig:
    """Sizes and repeats of every benchmark."""

    step_cases: list[StepCase] = field(default_factory=list)
    """Pretraining-step configurations (each in its own process)."""
    matmul_sizes: list[int] = field(default_factory=lambda: [4096])
    """Square matmul sides for the stand-alone matmul table."""
    input_images: int = 64
    """Generated JPEGs per input-pipeline measurement."""
    input_repeats: int = 3
    """Passes over them (best kept)."""
    input_image_size: int = 224
    """Crop size of the input pipelines."""
    checkpoint_arch: str = "vit_base"
    """Model whose full training state is saved and loaded."""
    checkpoint_repeats: int = 2
    """Saves and loads timed."""
    probe_cases: list[dict] = field(default_factory=list)
    """Keyword arguments of `probes.run` per probe measurement."""
    shape: ModelShape = field(default_factory=ModelShape)
    """Model geometry (the tiny profile shrinks it)."""
    scratch_dir: str | None = None
    """Where checkpoints are written (None = the system temp folder)."""
    devices: list[str] = field(default_factory=lambda: ["cpu", "cuda"])
    """Devices of the matmul, step and probe benchmarks (CUDA ones run only where CUDA is present)."""


def _available(device: str) -> bool:
    return device == "cpu" or (device == "cuda" and torch.cuda.is_available())


def full_profile(threads: int | None = None) -> SuiteConfig:
    """The issue's configurations; about 5-8 minutes on a quiet 2-core CPU."""
    cases = [
        StepCase(arch=arch, batch=batch, precision=precision, threads=threads, warmup=1, steps=4)
        for arch, batch in (("vit_small", 16), ("vit_base", 8))
        for precision in ("fp32", "bf16")
    ]
    # Gradient accumulation's cost: the same 16 images as 4 micro-steps of 4, beside the whole-batch case above.
    cases.append(StepCase(arch="vit_small", batch=16, accum_steps=4, threads=threads, warmup=1, steps=4))
    probe_cases = [
        {"arch": "vit_base", "precision": p, "batch": 16, "repeats": 2, "threads": threads} for p in ("fp32", "bf16")
    ]
    if torch.cuda.is_available():
        # A GPU needs a real batch to be busy: per-GPU batch 256 (vit_base; global 2048 on 8 GPUs), 512 (vit_small).
        cases += [
            StepCase(arch=arch, batch=batch, precision=precision, device="cuda", warmup=3, steps=10, matmul_size=8192)
            for arch, batch in (("vit_small", 512), ("vit_base", 256))
            for precision in ("bf16", "fp32")
        ]
        probe_cases.append({"arch": "vit_base", "precision": "bf16", "device": "cuda", "batch": 256, "repeats": 5})
    return SuiteConfig(step_cases=cases, probe_cases=probe_cases)


def quick_profile(threads: int | None = None) -> SuiteConfig:
    """vit_small only, one warm-up and three timed steps, small repeats: a smoke run of the real sizes."""
    cases = [
        StepCase(arch="vit_small", batch=16, precision=p, threads=threads, warmup=1, steps=3) for p in ("fp32", "bf16")
    ]
    if torch.cuda.is_available():
        cases.append(
            StepCase(arch="vit_base", batch=256, precision="bf16", device="cuda", warmup=2, steps=5, matmul_size=8192)
        )
    return SuiteConfig(
        step_cases=cases,
        matmul_sizes=[2048],
        input_images=16,
        input_repeats=1,
        checkpoint_arch="vit_small",
        checkpoint_repeats=1,
        probe_cases=[{"arch": "vit_small", "precision": "bf16", "batch": 8, "repeats": 1, "threads": threads}],
    )


def tiny_profile(threads: int | None = None) -> SuiteConfig:
    """vit_nano at 32 px with a 64-wide head, one thread unless told: every benchmark runs end to end in seconds."""
    threads = threads or 1
    shape = ModelShape(img_size=32, patch_size=4, mlp_dim=64)
    cases = [
        StepCase(
            arch="vit_nano",
            batch=4,
            precision=p,
            threads=threads,
            warmup=1,
            steps=2,
            matmul_size=256,
            **shape.kwargs(),
        )
        for p in ("fp32", "bf16")
    ]
    cases.append(dataclasses.replace(cases[0], accum_steps=2))
    probe = {
        "arch": "vit_nano",
        "precision": "fp32",
        "batch": 4,
        "repeats": 1,
        "threads": threads,
        "head_batch": 64,
        "knn_bank": 256,
        "knn_queries": 16,
        **{k: v for k, v in shape.kwargs().items() if k != "mlp_dim"},
    }
    return SuiteConfig(
        step_cases=cases,
        matmul_sizes=[256],
        input_images=4,
        input_repeats=1,
        input_image_size=64,
        checkpoint_arch="vit_nano",
        checkpoint_repeats=1,
        probe_cases=[probe],
        shape=shape,
    )


PROFILES = {"full": full_profile, "quick": quick_profile, "tiny": tiny_profile}


def _input_records(result: dict) -> list[dict]:
    """One record per pipeline and per colour device from `input_pipeline.run`'s dict."""
    ref_ms = result["reference"]["cpu_ms"]
    records = []
    for name in ("reference", "color_cpu", "crop_only", "decode_only"):
        r = result[name]
        records.append(
            {
                "bench": "input_pipeline",
                "kind": "pipeline",
                "case": name,
                **r,
                "speedup_vs_reference": ref_ms / r["cpu_ms"],
                "image_size": result["image_size"],
                "files": result["files"],
                "core": result["core"],
            }
        )
    for r in result["device_colour"]:
        records.append({"bench": "input_pipeline", "kind": "device_colour", "case": f"colour/{r['device']}", **r})
    return records


def run_suite(cfg: SuiteConfig, out_dir: Path, only: set[str] | None = None, command: str = "") -> Path:
    """Run the selected benchmarks, append JSONL records under out_dir, write out_dir/summary.md; return it."""
    only = set(only or BENCHMARKS)
    unknown = only - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    machine = machine_info(ROOT)
    records: list[dict] = []

    if "matmul" in only:
        for device in filter(_available, cfg.devices):
            sizes = cfg.matmul_sizes if device == "cpu" else [8192]
            for precision in ("fp32", "bf16"):
                for size in sizes:
                    log.info("matmul %s %s %d", device, precision, size)
                    mm = matmul_gflops(precision, size, 3, device)
                    records.append({"bench": "matmul", "device": device, "case": f"{device}/{precision}/{size}", **mm})
    if "pretrain_step" in only:
        for case in [c for c in cfg.step_cases if c.device in cfg.devices]:
            log.info("pretraining step %s", case.name)
            record = run_case(case)
            records.append(record)
            if "error" in record:
                log.error("%s failed: %s", case.name, record["error"])
            else:
                log.info("%s: %.2f img/s", case.name, record["img_per_s"])
    if "input_pipeline" in only:
        log.info("input pipeline on %d generated JPEGs", cfg.input_images)
        result = input_pipeline.run(
            num_images=cfg.input_images,
            image_size=cfg.input_image_size,
            repeats=cfg.input_repeats,
            device_batch=min(64, cfg.input_images),
        )
        records += _input_records(result)
    if "checkpoint" in only:
        log.info("checkpoint save/load of %s", cfg.checkpoint_arch)
        records.append(
            checkpoint_io.run(cfg.checkpoint_arch, cfg.checkpoint_repeats, cfg.scratch_dir, **cfg.shape.kwargs())
        )
    if "probes" in only:
        for options in [o for o in cfg.probe_cases if o.get("device", "cpu") in cfg.devices]:
            log.info("probes %s", options)
            records.append(probes.run(**options))

    machine["load_average_end"] = load_average()
    write_jsonl(out_dir, [{"bench": "machine", **machine, "command": command}, *records], run_id)
    summary = out_dir / "summary.md"
    summary.write_text(render_summary(machine, records, command, run_id))
    return summary
