"""Linear-probe and fast-probe throughput, through the evaluation trainers' own step functions.

- linear probe: `LinearProbeTrainer.train_step` (frozen-backbone forward + one SGD step of the head), img/s;
- fast probe: feature extraction (`FastProbeTrainer.features` under the run's autocast, img/s), one step of
  the whole head grid (`FastProbeTrainer.head_step`, rows/s, with the grid sized for ImageNet's 1000
  classes), and kNN (`knn_scores`, query-bank similarity pairs/s).

Data loading is not included: the trainers get tensors. A projection to ImageNet-1K (90 epochs) is given
for both protocols. The trainers need an image folder to start; a few tiny PNGs serve.

    python -m benchmarks.probes '{"arch": "vit_base", "precision": "bf16"}'
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from benchmarks import worker
from benchmarks.machine import load_average

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000


def _tiny_image_folder(root: Path, per_split: int = 4) -> None:
    for split in ("train", "val"):
        folder = root / split / "class_0"
        folder.mkdir(parents=True)
        for i in range(per_split):
            Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(folder / f"{i}.png")


def _timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def measure_probes(payload: dict) -> dict:
    """Throughput of both probes for one (arch, precision, device); see the module docstring."""
    from extrema.config import DataConfig, ModelConfig, RunConfig
    from extrema.config.evaluation import FastProbeConfig, LinearProbeConfig
    from extrema.engine.fast_probe import FastProbeTrainer
    from extrema.engine.head_grid import GridSGD
    from extrema.engine.knn import knn_scores
    from extrema.engine.linear_probe import LinearProbeTrainer
    from extrema.models.head_grid import HeadGrid
    from extrema.precision import autocast

    arch, precision, device_name = payload["arch"], payload["precision"], payload.get("device", "cpu")
    img, patch = payload.get("img_size", 224), payload.get("patch_size", 16)
    batch, repeats, warmup = payload.get("batch", 32), payload.get("repeats", 3), payload.get("warmup", 1)
    head_batch, num_classes = payload.get("head_batch", 4096), payload.get("num_classes", IMAGENET_CLASSES)
    bank_rows, queries = payload.get("knn_bank", 65536), payload.get("knn_queries", 1024)
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    device = torch.device(device_name)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img, img, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (max(batch, head_batch),), generator=gen).to(device)

    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        root = Path(tmp) / "data"
        _tiny_image_folder(root)
        common = {
            "model": ModelConfig(arch=arch, img_size=img, patch_size=patch, drop_path_rate=0.0),
            "data": DataConfig(root=str(root), num_workers=0, cache_dir=str(Path(tmp) / "cache")),
            "run": RunConfig(precision=precision, device=device_name, threads=payload.get("threads")),
        }
        # Train batches are handed in directly; the configured batch only has to fit the tiny folder.
        linear = LinearProbeTrainer(
            LinearProbeConfig(**common, batch_size=2, epochs=1, warmup_epochs=0), Path(tmp) / "lp"
        )
        lp_times = _timed(
            lambda: linear.train_step(images, labels[:batch] % linear.splits.num_classes), warmup, repeats, device
        )

        fast = FastProbeTrainer(
            FastProbeConfig(**common, batch_size=2, epochs=1, warmup_epochs=0, knn=False), Path(tmp) / "fp"
        )

        def extract() -> torch.Tensor:
            with autocast(precision, device):
                return fast.features(images)

        ex_times = _timed(extract, warmup, repeats, device)
        # The grid as it would be for ImageNet: every head maps D -> 1000 classes.
        fast.grid = HeadGrid(fast.dim, num_classes, fast.specs, torch.Generator().manual_seed(0)).to(device)
        fast.optimizer = GridSGD(fast.grid, fast.cfg.momentum, fast.optimizer.param_groups[0]["lr_scale"])
        features = torch.randn(head_batch, fast.dim, generator=gen).to(device)
        head_times = _timed(lambda: fast.head_step(features, labels[:head_batch]), warmup, repeats, device)
        bank = torch.randn(bank_rows, fast.dim, generator=gen).to(device)
        bank_labels = torch.randint(0, num_classes, (bank_rows,), generator=gen).to(device)
        query = torch.randn(queries, fast.dim, generator=gen).to(device)
        knn_times = _timed(lambda: knn_scores(bank, bank_labels, query, num_classes), warmup, repeats, device)
        num_heads = len(fast.specs)

    lp_img_s = batch / statistics.median(lp_times)
    ex_img_s = batch / statistics.median(ex_times)
    head_rows_s = head_batch / statistics.median(head_times)
    knn_pairs_s = bank_rows * queries / statistics.median(knn_times)
    fit_rows = IMAGENET_TRAIN * 0.9  # the fast probe holds 10% of train out to choose the head
    return {
        "bench": "probes",
        "case": f"{arch}/{precision}/{device_name}",
        "arch": arch,
        "precision": precision,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "linear_probe_img_per_s": lp_img_s,
        "fast_probe_extract_img_per_s": ex_img_s,
        "fast_probe_heads": num_heads,
        "fast_probe_head_rows_per_s": head_rows_s,
        "knn_pairs_per_s": knn_pairs_s,
        # ImageNet-1K, 90 epochs, this device, data loading excluded.
        "linear_probe_imagenet_hours": (90 * IMAGENET_TRAIN + IMAGENET_VAL) / lp_img_s / 3600,
        "fast_probe_imagenet_hours": (
            (IMAGENET_TRAIN + IMAGENET_VAL) / ex_img_s
            + 90 * fit_rows / head_rows_s
            + IMAGENET_VAL * IMAGENET_TRAIN / knn_pairs_s
        )
        / 3600,
        "load_average": load_average(),
    }


def run(arch: str, precision: str, device: str = "cpu", **options) -> dict:
    """Measure in a fresh process; a failure becomes a record with an "error" field."""
    payload = {"arch": arch, "precision": precision, "device": device, **options}
    record = worker.call("benchmarks.probes", payload)
    return {
        "bench": "probes",
        "case": f"{arch}/{precision}/{device}",
        "arch": arch,
        "precision": precision,
        "device": device,
        **record,
    }


if __name__ == "__main__":
    worker.serve(measure_probes)
