"""The device's measured matmul rate: large square matmuls, the yardstick for a training step's efficiency.

On a CPU the datasheet peak is rarely reached by anything, so the step is compared with what the BLAS
library reaches on large square matmuls with the same threads; on a GPU it is also compared with the
datasheet peak (MFU, see `gpu_peak_tflops`).
"""

from __future__ import annotations

import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) datasheet peaks in TFLOP/s: {"bf16": tensor cores, "fp32": plain FP32 (no TF32)}.
# Matched by substring of torch.cuda.get_device_name(); first match wins, so specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("V100", {"bf16": 0.0, "fp32": 15.7}),  # no bf16 tensor cores (fp16: 125)
]


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Datasheet dense peak of a GPU for fp32 or bf16 (None when the GPU or the precision is not listed)."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in device_name:
            return peaks.get(precision) or None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    precision: str = "fp32", size: int = 4096, repeats: int = 3, device: str | torch.device = "cpu"
) -> dict:
    """GFLOP/s of (size x size) @ (size x size) in `precision` with the current torch threads.

    Returns {"precision", "size", "median_gflops", "best_gflops", "seconds"}; one untimed warm-up call first
    (it loads kernels and, on a CPU, faults in the output pages).
    """
    device = torch.device(device)
    dtype = DTYPES[precision]
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.float32, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, dtype=torch.float32, generator=gen).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    # On a fast GPU one matmul takes a fraction of a millisecond: time a burst of them per sample.
    inner = 1 if device.type == "cpu" else 20
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
        cpu_times.append((time.process_time() - c0) / inner)
    flop = 2.0 * size**3
    return {
        "precision": precision,
        "size": size,
        "threads": torch.get_num_threads(),
        "median_gflops": flop / statistics.median(times) / 1e9,
        "best_gflops": flop / min(times) / 1e9,
        # Per CPU-second (all threads): unlike wall time, barely moved by other processes' time slices.
        "gflops_per_cpu_s": flop / statistics.median(cpu_times) / 1e9 if device.type == "cpu" else None,
        "seconds": times,
    }
