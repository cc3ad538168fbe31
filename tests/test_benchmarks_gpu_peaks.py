"""The GPU yardsticks of the step benchmark: each device name gets its own datasheet peaks, fp16 is compared
with fp16 rates, and FLOPs are counted at the timed batch (no GPU needed: names and rates are given)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import pretrain_step
from benchmarks.matmul import gpu_peak_tflops, normalise_gpu_name
from benchmarks.pretrain_step import StepCase

# torch.cuda.get_device_name() of real parts -> (bf16, fp16, fp32) dense TFLOP/s.
REAL_NAMES = {
    "NVIDIA L4": (121.0, 121.0, 30.3),
    "NVIDIA L40": (181.0, 181.0, 90.5),
    "NVIDIA L40S": (362.0, 362.0, 91.6),
    "NVIDIA H100 80GB HBM3": (989.0, 989.0, 67.0),
    "NVIDIA H100 PCIe": (756.0, 756.0, 51.0),
    "NVIDIA H100 NVL": (835.0, 835.0, 60.0),
    "NVIDIA H200": (989.0, 989.0, 67.0),
    "NVIDIA H200 NVL": (835.0, 835.0, 60.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 312.0, 19.5),
    "NVIDIA A100-SXM4-40GB": (312.0, 312.0, 19.5),
    "NVIDIA A100-PCIE-40GB": (312.0, 312.0, 19.5),
    "NVIDIA A100 80GB PCIe": (312.0, 312.0, 19.5),
    "Tesla V100-SXM2-32GB": (None, 125.0, 15.7),
    "Tesla V100-PCIE-16GB": (None, 112.0, 14.0),
}


@pytest.mark.parametrize("name, peaks", REAL_NAMES.items())
def test_each_real_gpu_name_gets_its_own_peaks(name: str, peaks: tuple) -> None:
    assert tuple(gpu_peak_tflops(name, p) for p in ("bf16", "fp16", "fp32")) == peaks


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA L40G", "NVIDIA H100", "NVIDIA GH200 480GB", ""])
def test_a_gpu_that_is_not_listed_has_no_peak(name: str) -> None:
    # No guess from a similar name: an MFU against another part's peak would be wrong, not missing.
    assert gpu_peak_tflops(name, "bf16") is None


def test_names_are_normalised_before_matching() -> None:
    assert normalise_gpu_name("  NVIDIA  A100-SXM4-80GB ") == normalise_gpu_name("a100 sxm4 80gb") == "a100 sxm4 80gb"


def test_an_fp16_step_is_compared_with_fp16_rates(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    case = StepCase(batch=4, precision="fp16", device="cuda")
    samples = {"fp32": [(10_000.0, None)], "fp16": [(100_000.0, None)]}
    rates = pretrain_step._step_rates(case, torch.device("cuda"), [(0.5, 0.5)], samples, flops_per_image=1e12)
    achieved = 1e12 * 4 / 0.5 / 1e9  # GFLOP/s
    assert rates["fraction_of_matmul_fp16"] == pytest.approx(achieved / 100_000.0)
    assert rates["datasheet_peak_tflops"] == 125.0  # a V100 has no bf16 rate to compare with
    assert rates["mfu"] == pytest.approx(achieved / 125_000.0)


def test_flops_are_counted_at_the_timed_batch(monkeypatch) -> None:
    counted: list[int] = []

    def count(trainer, student, teacher, images: int = 2) -> dict:
        counted.append(images)
        return {"flops_per_image": 1e6, "teacher_flops_per_image": 1e5}

    monkeypatch.setattr(pretrain_step, "count_flops_per_image", count)
    case = StepCase(
        arch="vit_nano", batch=6, img_size=32, patch_size=8, mlp_dim=32, proj_dim=16, steps=1, threads=1, matmul_size=32
    )
    pretrain_step.measure_step(case)
    assert counted == [case.batch]
