"""Pretraining-step throughput, FLOPs and peak memory, through the project's own `PretrainTrainer.train_step`.

Each configuration runs in a fresh process (`run_case`), so its peak memory is its own and thread
settings do not leak. Inside, in this order: build the trainer; count the FLOPs of one forward+backward
with `torch.utils.flop_counter` (at the timed batch, so a compiled model keeps one graph); reset the
peak-RSS mark and run the warm-up steps (peak memory); then time the steps (masks drawn by the trainer,
AdamW, EMA update), each followed by one large square matmul with the same threads, so that the step's
fraction of the matmul rate is a ratio of samples taken side by side under the same machine load; on
the CPU, last, one profiled step splits the step's time into its matmuls and the rest.

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
from benchmarks.matmul import MatmulRate, gpu_peak_tflops

log = logging.getLogger(__name__)


@dataclass
class StepCase:
    """One pretraining-step configuration."""

    arch: str = "vit_small"
    """Encoder size by name."""
    batch: int = 16
    """Images per optimizer step (one process)."""
    accum_steps: int = 1
    """Micro-steps the batch is split into (gradient accumulation)."""
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

    @property
    def name(self) -> str:
        accum = f"/accum{self.accum_steps}" if self.accum_steps > 1 else ""
        return f"{self.arch}/b{self.batch}{accum}/{self.precision}/{self.device}" + ("/compile" if self.compile else "")


def build_trainer(case: StepCase, run_dir: Path):
    """A `PretrainTrainer` for the case, with the recipe's model (drop-path 0.1, 80% x 5) and AdamW."""
    from extrema.config import MaskConfig, ModelConfig, OptimConfig, PretrainConfig, RunConfig
    from extrema.engine.pretrain import PretrainTrainer
    from extrema.engine.pretrain_data import HandedBatches

    cfg = PretrainConfig(
        model=ModelConfig(
            arch=case.arch,
            img_size=case.img_size,
            patch_size=case.patch_size,
            mlp_dim=case.mlp_dim,
            proj_dim=case.proj_dim,
        ),
        mask=MaskConfig(ratio=case.mask_ratio, num_masks=case.num_masks),
        optim=OptimConfig(batch_size=case.batch, accum_steps=case.accum_steps, epochs=100, warmup_epochs=1),
        # log_every_steps: no grad-norm reduction inside the timed steps (as on most steps of a real run).
        run=RunConfig(precision=case.precision, device=case.device, threads=case.threads, log_every_steps=10**9),
        compile=case.compile,
    )
    return PretrainTrainer(cfg, run_dir, data=HandedBatches())


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
    keep = trainer._draw_masks(images, torch.Generator())  # a fresh stream: the timed steps' masks stay as drawn
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_flash_attention_flops())
    with counter:
        out = trainer.net(student[:images], teacher[:images], keep)
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
        record = {"bench": "pretrain_step", "case": case.name, **dataclasses.asdict(case)}
        # At the timed batch: a compiled model would otherwise compile for the counted batch first and time a
        # second, recompiled graph (a dynamic-shape one) instead of the one a run of this batch uses.
        record.update(count_flops_per_image(trainer, student, teacher, images=case.batch))

        # Peak memory over the warm-up steps (the first one also allocates the optimizer state).
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before, peak_reset = rss_mib(), reset_peak_rss()
        for _ in range(case.warmup):
            loss = float(trainer.train_step(student, teacher)["loss"])  # float() also waits for the device
        record.update(_peak_memory(device, rss_before, peak_reset))

        # Each timed step is followed by one matmul per precision: both kinds of sample then span the same
        # stretch of time, so a best-against-best ratio cannot pair a quiet step with a busy matmul.
        precisions = ["fp32"] + ([case.precision] if case.precision in ("bf16", "fp16") else [])
        matmuls = {p: MatmulRate(p, case.matmul_size, device) for p in precisions}
        steps, samples = [], {p: [] for p in precisions}
        for _ in range(case.steps):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = float(trainer.train_step(student, teacher)["loss"])
            steps.append((time.perf_counter() - t0, time.process_time() - c0))
            for p, rate in matmuls.items():
                samples[p].append(rate.sample())
        breakdown = matmul_share(trainer, student, teacher) if device.type == "cpu" else {}
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"{case.name}: the loss is {loss}; the benchmark measured a broken step")
        del trainer, student, teacher, matmuls
    record.update(_step_rates(case, device, steps, samples, record["flops_per_image"]))
    if breakdown:
        # The fraction of the matmul rate the step would reach if every other op took no time.
        step_gflop = record["flops_per_image"] * case.batch / 1e9
        record.update(breakdown, fraction_ceiling=step_gflop / breakdown["matmul_s"] / record["matmul_fp32_gflops"])
    record.update(loss=loss, load_average=load_average())
    return record


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_share(trainer, student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Where one CPU step's time goes: its matmuls' share of the wall time and their own GFLOP/s.

    One extra step under torch.profiler. An addmm's self time leaves out its bias copy (a child op), so
    "matmul_s" is the time the matrix units are busy; everything else (norms, GELU, attention softmax,
    copies, AdamW, EMA) is the rest of the step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        float(trainer.train_step(student, teacher)["loss"])
        wall = time.perf_counter() - t0
    ops = [e for e in prof.key_averages() if e.key in MATMUL_OPS]
    seconds = sum(e.self_cpu_time_total for e in ops) / 1e6
    flops = sum(e.flops for e in ops)
    return {
        "profiled_step_s": wall,
        "matmul_s": seconds,
        "matmul_time_share": seconds / wall,
        "matmul_in_step_gflops": flops / seconds / 1e9 if seconds else None,
    }


def _peak_memory(device: torch.device, rss_before: float | None, peak_reset: bool) -> dict:
    if device.type == "cuda":
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory_kind": "torch.cuda.max_memory_allocated",
        }
    return {
        "peak_memory_mib": peak_rss_mib(),
        "memory_kind": "process peak RSS during the warm-up steps" if peak_reset else "process peak RSS",
        "rss_before_steps_mib": rss_before,
    }


def _step_rates(case: StepCase, device: torch.device, steps: list, samples: dict, flops_per_image: float) -> dict:
    """img/s, achieved GFLOP/s and their fraction of the matmul rates sampled between the steps."""
    wall = [w for w, _ in steps]
    cpu = [c for _, c in steps]
    threads = torch.get_num_threads()
    out: dict = {
        "threads": threads,
        "step_s_median": statistics.median(wall),
        "step_s_best": min(wall),
        "step_s_all": wall,
        "img_per_s": case.batch / statistics.median(wall),
        "img_per_s_best": case.batch / min(wall),
        # CPU seconds per wall second per thread: well below 1 means other work took the cores.
        "cpu_utilisation": sum(cpu) / sum(wall) / threads if device.type == "cpu" else None,
        "cpu_s_median": statistics.median(cpu),
    }
    achieved = flops_per_image * out["img_per_s"] / 1e9
    achieved_best = flops_per_image * out["img_per_s_best"] / 1e9
    out["achieved_gflops"] = achieved
    if device.type == "cpu":
        # On CPU seconds: robust to other processes taking turns on the cores (exact with one thread; with
        # several, threads that spin while waiting for a descheduled one count too).
        out["gflops_per_cpu_s"] = flops_per_image * case.batch / out["cpu_s_median"] / 1e9
    for p, pairs in samples.items():
        mm_wall = [w for w, _ in pairs]
        out[f"matmul_{p}_gflops"] = statistics.median(mm_wall)
        out[f"matmul_{p}_gflops_best"] = max(mm_wall)
        out[f"fraction_of_matmul_{p}"] = achieved / statistics.median(mm_wall)
        # Other work only ever slows a run down: best against best estimates a quiet machine.
        out[f"fraction_of_matmul_{p}_best"] = achieved_best / max(mm_wall)
        if device.type == "cpu":
            out[f"fraction_of_matmul_{p}_cpu_time"] = out["gflops_per_cpu_s"] / statistics.median([c for _, c in pairs])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, case.precision)  # fp16 against the fp16 rate: not every GPU has bf16
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
