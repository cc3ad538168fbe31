"""The device's measured matmul rate: large square matmuls, the yardstick for a training step's efficiency.

On a CPU the datasheet peak is rarely reached by anything, so the step is compared with what the BLAS
library reaches on large square matmuls with the same threads; on a GPU it is also compared with the
datasheet peak (MFU, see `gpu_peak_tflops`).
"""

from __future__ import annotations

import re
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) datasheet peaks in TFLOP/s per GPU: "bf16" / "fp16" on tensor cores, "fp32" plain FP32
# (no TF32). Keyed by the normalised name torch.cuda.get_device_name() gives (`normalise_gpu_name`), matched
# exactly: a substring would give an L40 the L4's peaks and an H100 NVL the SXM part's.
_SXM_HOPPER = {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}
_NVL_HOPPER = {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}
_A100 = {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}
_V100_SXM2 = {"fp16": 125.0, "fp32": 15.7}  # no bf16 tensor cores
_V100_PCIE = {"fp16": 112.0, "fp32": 14.0}
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h200": _SXM_HOPPER,
    "h200 nvl": _NVL_HOPPER,
    "h100 80gb hbm3": _SXM_HOPPER,
    "h100 sxm5 80gb": _SXM_HOPPER,
    "h100 pcie": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "h100 nvl": _NVL_HOPPER,
    "a100 sxm4 40gb": _A100,
    "a100 sxm4 80gb": _A100,
    "a100 pcie 40gb": _A100,
    "a100 80gb pcie": _A100,
    "l40s": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "l40": {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5},
    "l4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "v100 sxm2 16gb": _V100_SXM2,
    "v100 sxm2 32gb": _V100_SXM2,
    "v100 pcie 16gb": _V100_PCIE,
    "v100 pcie 32gb": _V100_PCIE,
}


def normalise_gpu_name(device_name: str) -> str:
    """ "NVIDIA A100-SXM4-80GB" -> "a100 sxm4 80gb": lower case, no vendor prefix, words split by single spaces."""
    words = re.sub(r"[^a-z0-9]+", " ", device_name.lower()).split()
    while words and words[0] in ("nvidia", "tesla"):
        words = words[1:]
    return " ".join(words)


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Datasheet dense peak of a GPU for fp32, bf16 or fp16 (None when the GPU or the precision is not listed)."""
    return GPU_PEAK_TFLOPS.get(normalise_gpu_name(device_name), {}).get(precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulRate:
    """Times one (size x size) @ (size x size) matmul in `precision` per `sample()` (operands made once)."""

    def __init__(self, precision: str = "fp32", size: int = 4096, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.flop = 2.0 * size**3
        gen = torch.Generator(self.device).manual_seed(0)
        dtype = DTYPES[precision]
        self.a = torch.randn(size, size, device=self.device, generator=gen).to(dtype)
        self.b = torch.randn(size, size, device=self.device, generator=gen).to(dtype)
        self.out = torch.empty(size, size, device=self.device, dtype=dtype)
        # On a fast GPU one matmul takes a fraction of a millisecond: time a burst of them per sample.
        self.inner = 1 if self.device.type == "cpu" else 20
        self.sample()  # warm-up: loads kernels and, on a CPU, faults in the output pages

    def sample(self) -> tuple[float, float]:
        """(GFLOP/s on wall time, GFLOP/s per CPU-second of this process) of one timed burst."""
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(self.inner):
            torch.mm(self.a, self.b, out=self.out)
        _sync(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return self.flop * self.inner / wall / 1e9, self.flop * self.inner / max(cpu, 1e-9) / 1e9


def matmul_gflops(
    precision: str = "fp32", size: int = 4096, repeats: int = 3, device: str | torch.device = "cpu"
) -> dict:
    """GFLOP/s of (size x size) @ (size x size) in `precision` with the current torch threads.

    Returns {"precision", "size", "threads", "median_gflops", "best_gflops", "gflops_per_cpu_s", "samples"}.
    GFLOP/s per CPU-second (all threads) is barely moved by other processes' time slices, unlike wall time.
    """
    rate = MatmulRate(precision, size, device)
    samples = [rate.sample() for _ in range(repeats)]
    wall = [w for w, _ in samples]
    return {
        "precision": precision,
        "size": size,
        "threads": torch.get_num_threads(),
        "median_gflops": statistics.median(wall),
        "best_gflops": max(wall),
        "gflops_per_cpu_s": statistics.median([c for _, c in samples]) if rate.device.type == "cpu" else None,
        "samples": wall,
    }
