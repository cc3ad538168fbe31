"""The benchmark suite runs end to end (`python -m benchmarks --tiny`) and writes complete, finite results.

Speed is not tested here (targets live in the benchmark summary); these tests fail when a benchmark
crashes, drops a field, writes a non-finite number, or counts FLOPs wrongly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.pretrain_step import _cpu_flash_attention_flops
from benchmarks.report import render_summary

ROOT = Path(__file__).resolve().parents[1]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_positive_finite(record: dict, *fields: str) -> None:
    for name in fields:
        value = record[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (
            f"{record.get('case')}: {name}={value}"
        )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_benchmark_writes_finite_records(results: Path) -> None:
    files = {p.stem for p in results.glob("*.jsonl")}
    assert files == {"machine", "matmul", "pretrain_step", "input_pipeline", "checkpoint", "probes"}

    (machine,) = _read_jsonl(results / "machine.jsonl")
    assert machine["cpu_model"] and machine["packages"]["torch"] == torch.__version__.split("+")[0]
    _assert_positive_finite(machine, "torch_threads", "usable_cores")

    for mm in _read_jsonl(results / "matmul.jsonl"):
        _assert_positive_finite(mm, "median_gflops", "best_gflops")

    steps = {r["precision"]: r for r in _read_jsonl(results / "pretrain_step.jsonl")}
    assert set(steps) == {"fp32", "bf16"}
    for r in steps.values():
        assert "error" not in r, r.get("error")
        _assert_positive_finite(
            r,
            "img_per_s",
            "step_s_median",
            "flops_per_image",
            "achieved_gflops",
            "matmul_fp32_gflops",
            "fraction_of_matmul_fp32",
            "fraction_of_matmul_fp32_best",
            "fraction_of_matmul_fp32_cpu_time",
            "cpu_s_median",
            "peak_memory_mib",
            "loss",
        )
        assert len(r["step_s_all"]) == r["steps"]
        assert 0 < r["teacher_flops_per_image"] < r["flops_per_image"]
        # The profiled step splits into its matmuls and the rest; the ceiling bounds the achieved fraction.
        _assert_positive_finite(r, "matmul_s", "matmul_in_step_gflops", "fraction_ceiling")
        assert 0 < r["matmul_time_share"] < 1 and r["matmul_s"] < r["profiled_step_s"]
    _assert_positive_finite(steps["bf16"], "matmul_bf16_gflops", "fraction_of_matmul_bf16")
    # Autocast changes the number type, not the work: both precisions count the same FLOPs.
    assert steps["fp32"]["flops_per_image"] == steps["bf16"]["flops_per_image"]

    pipes = {r["case"]: r for r in _read_jsonl(results / "input_pipeline.jsonl") if r["kind"] == "pipeline"}
    assert set(pipes) == {"reference", "color_cpu", "crop_only", "decode_only"}
    for r in pipes.values():
        _assert_positive_finite(r, "img_per_s_per_core", "cpu_ms", "speedup_vs_reference")
    assert pipes["reference"]["speedup_vs_reference"] == 1.0

    (ckpt,) = _read_jsonl(results / "checkpoint.jsonl")
    assert "error" not in ckpt, ckpt.get("error")
    _assert_positive_finite(ckpt, "file_mib", "save_s", "load_s", "parameters")

    (probe,) = _read_jsonl(results / "probes.jsonl")
    assert "error" not in probe, probe.get("error")
    _assert_positive_finite(
        probe,
        "linear_probe_img_per_s",
        "fast_probe_extract_img_per_s",
        "fast_probe_head_rows_per_s",
        "knn_pairs_per_s",
        "fast_probe_imagenet_hours",
    )


@pytest.mark.slow
def test_summary_names_machine_cases_and_targets(results: Path) -> None:
    text = (results / "summary.md").read_text()
    (machine,) = _read_jsonl(results / "machine.jsonl")
    assert machine["cpu_model"] in text and f"torch {machine['packages']['torch']}" in text
    for section in (
        "## Matmul rate",
        "## Pretraining step",
        "## Input pipeline",
        "## Checkpoint",
        "## Evaluation throughput",
        "## Targets",
    ):
        assert section in text
    for r in _read_jsonl(results / "pretrain_step.jsonl"):
        assert f"| {r['case']} |" in text
    assert "## Failed measurements" not in text


def test_cpu_attention_flops_are_counted() -> None:
    # (B, heads, N, d): QK^T and AV are 2 * B * h * N * N * d FLOPs each; backward is twice that plus a recompute.
    b, h, n, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_flash_attention_flops())
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    forward = 2 * (2 * b * h * n * n * d)
    assert counter.get_total_flops() == forward + 2.5 * forward


def test_summary_verdicts_follow_the_targets() -> None:
    machine = {
        "packages": {"torch": "x"},
        "cuda_devices": [],
        "cpu_model": "cpu",
        "usable_cores": 2,
        "cpu_count": 2,
        "torch_threads": 2,
        "cpu_features": [],
        "torch_cpu_capability": "x",
        "cuda_version": None,
        "os": "os",
        "hostname": "h",
        "git_commit": None,
        "load_average": None,
    }
    step = {
        "bench": "pretrain_step",
        "arch": "vit_small",
        "batch": 16,
        "steps": 3,
        "threads": 2,
        "device": "cpu",
        "compile": False,
        "img_size": 224,
        "img_per_s": 5.0,
        "img_per_s_best": 5.0,
        "step_s_median": 3.2,
        "flops_per_image": 3.6e10,
        "achieved_gflops": 180.0,
        "peak_memory_mib": 1.0,
        "matmul_fp32_gflops": 190.0,
    }
    fast = {
        **step,
        "case": "a/fp32",
        "precision": "fp32",
        "fraction_of_matmul_fp32": 0.85,
        "fraction_of_matmul_fp32_best": 0.95,
        "fraction_of_matmul_fp32_cpu_time": 0.97,
    }
    bf16 = {**step, "case": "a/bf16", "precision": "bf16", "img_per_s": 8.0, "img_per_s_best": 9.0}
    text = render_summary(machine, [fast, bf16], "cmd", "run")
    assert "fp32 step at 0.95 of the fp32 matmul rate, best of 3 (median 0.85, on CPU time 0.97; torch th" in text
    assert "(target ≥ 0.9): PASS" in text
    assert "bf16 / fp32 img/s = 1.8, best of each (medians: 1.6) (target ≥ 2.0): FAIL" in text
    assert "bf16 best / reference fp32 anchor (4.2 img/s) = 2.14 (target ≥ 2, valid only" in text
    slow = {**fast, "fraction_of_matmul_fp32_best": 0.5}
    assert "torch threads: 2) (target ≥ 0.9): FAIL" in render_summary(machine, [slow], "cmd", "run")
