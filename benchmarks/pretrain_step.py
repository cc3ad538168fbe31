"""Pretraining-step throughput, FLOPs and peak memory, through the project's own `PretrainTrainer.train_step`.

Each configuration runs in a fresh process (`run_case`), so its peak memory is its own and thread
settings do not leak. Inside, in this order: build the trainer; count the FLOPs of one forward+backward
with `torch.utils.flop_counter` (on a 2-image slice: every FLOP of the step is per image); reset the
peak-RSS mark; time `warmup + steps` full steps (masks drawn by the trainer, AdamW, EMA update); then
time large square matmuls with the same threads, side by side, so that the step's fraction of the
matmul rate is a ratio taken under the same machine load.

    python -m benchmarks.pretrain_step '{"arch": "vit_small", "batch": 16, "precision": "bf16"}'
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import flop_counter

from benchmarks import worker
from benchmarks.machine import load_average, peak_rss_mib, reset_peak_rss, rss_mib
from benchmarks.matmul import gpu_peak_tflops, matmul_gflops

log = logging.getLogger(__name__)


@dataclass
class StepCase:
    """One pretraining-step configuration."""

    arch: str = "vit_small"
    """Encoder size by name."""
    batch: int = 16
    """Images per step (one process)."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast, no loss scaler) or fp16 (autocast + scaler)."""
    device: str = "cpu"
    """cpu or cuda."""
    img_size: int = 224
    """Input resolution."""
    patch_size: int = 16
    """Patch side."""
    mask_ratio: float = 0.8
    """Fraction of tokens each mask hides."""
    num_masks: int = 5
    """Masked student views per image."""
    mlp_dim: int = 4096
    """Projector / predictor hidden width (the recipe's 4096)."""
    proj_dim: int = 256
    """Projector output width."""
    warmup: int = 1
    """Untimed steps first (the first allocates the optimizer state)."""
    steps: int = 3
    """Timed steps."""
    threads: int | None = None
    """torch threads on the CPU; None = all usable cores."""
    compile: bool = False
    """torch.compile the student encoder (`PretrainConfig.compile`)."""
    matmul_size: int = 4096
    """Side of the square matmuls that measure the device's rate."""
    matmul_repeats: int = 3
    """Timed matmuls per precision."""

    @property
    def name(self) -> str:
        return f"{self.arch}/b{self.batch}/{self.precision}/{self.device}" + ("/compile" if self.compile else "")


class _TensorBatches:
    """Stands in for `PretrainData`: the benchmark hands tensors to `train_step` itself."""

    steps_per_epoch = 1_000_000

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def bad_images(self) -> int:
        return 0


def build_trainer(case: StepCase, run_dir: Path):
    """A `PretrainTrainer` for the case, with the recipe's model (drop-path 0.1, 80% x 5) and AdamW."""
    from extrema.config import MaskConfig, ModelConfig, OptimConfig, PretrainConfig, RunConfig
    from extrema.engine.pretrain import PretrainTrainer

    cfg = PretrainConfig(
        model=ModelConfig(
            arch=case.arch,
            img_size=case.img_size,
            patch_size=case.patch_size,
            mlp_dim=case.mlp_dim,
            proj_dim=case.proj_dim,
        ),
        mask=MaskConfig(ratio=case.mask_ratio, num_masks=case.num_masks),
        optim=OptimConfig(batch_size=case.batch, epochs=100, warmup_epochs=1),
        # log_every_steps: no grad-norm reduction inside the timed steps (as on most steps of a real run).
        run=RunConfig(precision=case.precision, device=case.device, threads=case.threads, log_every_steps=10**9),
        compile=case.compile,
    )
    return PretrainTrainer(cfg, run_dir, data=_TensorBatches())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def _cpu_flash_attention_flops() -> dict:
    # torch's FLOP table lists the CUDA attention kernels only; the CPU flash kernel does the same matmuls.
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }


def count_flops_per_image(trainer, student: torch.Tensor, teacher: torch.Tensor, images: int = 2) -> dict:
    """FLOPs of one forward+backward of the siamese model per image (matmuls, convolutions, attention).

    Counted on `images` images: each image's tokens only meet its own tokens, so FLOPs scale with the batch.
    Counted in fp32 whatever the case's precision: the model's work is the same in every precision, while
    the kernels (and so what the counter sees, e.g. attention's recomputation) may differ. The optimizer
    and EMA updates are elementwise and not counted (as in every MFU convention).
    """
    from extrema.masking import sample_masks

    m = trainer.cfg.mask
    keep = sample_masks(
        images, trainer.model.base_encoder.num_tokens, m.ratio, m.num_masks, torch.Generator(), m.disjoint
    )
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_flash_attention_flops())
    with counter:
        out = trainer.net(student[:images], teacher[:images], keep.to(student.device))
        out["loss"].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    by_module = counter.get_flop_counts()
    teacher_flops = sum(by_module.get("ExtremaModel.momentum_encoder", {}).values())
    total = counter.get_total_flops()
    return {"flops_per_image": total / images, "teacher_flops_per_image": teacher_flops / images}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(case: StepCase) -> dict:
    """Run one case in this process and return its record (see the module docstring for the order)."""
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as run_dir:
        trainer = build_trainer(case, Path(run_dir))
        gen = torch.Generator().manual_seed(0)
        shape = (case.batch, 3, case.img_size, case.img_size)
        student = torch.randn(shape, generator=gen).to(device)
        teacher = torch.randn(shape, generator=gen).to(device)
        flops = count_flops_per_image(trainer, student, teacher)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = rss_mib()
        peak_reset = reset_peak_rss()
        times, cpu_times = [], []
        for i in range(case.warmup + case.steps):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = trainer.train_step(student, teacher)
            loss = float(metrics["loss"])  # also waits for the device
            if i >= case.warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"{case.name}: the loss is {loss}; the benchmark measured a broken step")
        record = {
            "bench": "pretrain_step",
            "case": case.name,
            **dataclasses.asdict(case),
            "threads": torch.get_num_threads(),
            "step_s_median": statistics.median(times),
            "step_s_best": min(times),
            "step_s_all": times,
            "img_per_s": case.batch / statistics.median(times),
            "img_per_s_best": case.batch / min(times),
            # CPU seconds per wall second per thread: well below 1 means other work took the cores.
            "cpu_utilisation": sum(cpu_times) / sum(times) / torch.get_num_threads() if device.type == "cpu" else None,
            "cpu_s_median": statistics.median(cpu_times),
            "loss": loss,
            **flops,
        }
        if device.type == "cuda":
            record["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            record["memory_kind"] = "torch.cuda.max_memory_allocated"
        else:
            record["peak_memory_mib"] = peak_rss_mib()
            record["memory_kind"] = "process peak RSS during the steps" if peak_reset else "process peak RSS"
            record["rss_before_steps_mib"] = rss_before
        del trainer, student, teacher
    record.update(_rates(case, device, record))
    record["load_average"] = load_average()
    return record


def _rates(case: StepCase, device: torch.device, record: dict) -> dict:
    """Achieved GFLOP/s next to the matmul rates measured now (same process, same threads)."""
    achieved = record["flops_per_image"] * record["img_per_s"] / 1e9
    out: dict = {"achieved_gflops": achieved}
    if device.type == "cpu":
        # The same ratio on CPU seconds: robust to other processes taking turns on the cores (exact with
        # one thread; with several, threads that spin while waiting for a descheduled one count too).
        out["gflops_per_cpu_s"] = record["flops_per_image"] * case.batch / record["cpu_s_median"] / 1e9
    # Best step against best matmul: on a shared machine other work only ever slows a run down, so the
    # best of several is the closest estimate of a quiet machine; the medians are kept beside it.
    achieved_best = record["flops_per_image"] * record["img_per_s_best"] / 1e9
    for precision in ["fp32"] + (["bf16"] if case.precision == "bf16" else []):
        mm = matmul_gflops(precision, case.matmul_size, case.matmul_repeats, device)
        out[f"matmul_{precision}_gflops"] = mm["median_gflops"]
        out[f"matmul_{precision}_gflops_best"] = mm["best_gflops"]
        out[f"fraction_of_matmul_{precision}"] = achieved / mm["median_gflops"]
        out[f"fraction_of_matmul_{precision}_best"] = achieved_best / mm["best_gflops"]
        if device.type == "cpu":
            out[f"fraction_of_matmul_{precision}_cpu_time"] = out["gflops_per_cpu_s"] / mm["gflops_per_cpu_s"]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, "bf16" if case.precision in ("bf16", "fp16") else "fp32")
        out["gpu_name"] = name
        out["datasheet_peak_tflops"] = peak
        out["mfu"] = achieved / (peak * 1e3) if peak else None
    return out


def run_case(case: StepCase, timeout_s: float = 1800) -> dict:
    """Measure `case` in a fresh Python process; a failure becomes a record with an "error" field."""
    record = worker.call("benchmarks.pretrain_step", dataclasses.asdict(case), timeout_s)
    if "error" in record:
        record = {"bench": "pretrain_step", "case": case.name, **dataclasses.asdict(case), **record}
    return record


if __name__ == "__main__":
    worker.serve(lambda payload: measure_step(StepCase(**payload)))
