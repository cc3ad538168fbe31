"""Input-pipeline cost per image on one CPU core: the reference's two-view colour pipeline against
the crop-only CPU path whose colour ops run batched on the training device.

Files are generated JPEGs of ImageNet-like size and weight (500x375, ~110 KB: a multi-scale random
colour field plus grain, quality 90), so decoding costs what it costs on ImageNet. Each pipeline runs
in this process with one torch thread, pinned to one core; time is CPU time of the process (robust
to other load on a shared machine), wall time is reported beside it.

    python -m benchmarks.input_pipeline            # prints the JSON dict that run() returns
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

from extrema.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    color_views,
    make_pretrain_transform,
)
from extrema.data.loader import SampleKey, SeededSamples

logger = logging.getLogger(__name__)


def write_jpegs(folder: Path, num_images: int, size: tuple[int, int] = (375, 500), seed: int = 0) -> list[Path]:
    """Write `num_images` photo-like (H, W) JPEGs into folder/class_0/ and return their paths."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = folder / "class_0"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        pixels = np.zeros((h, w, 3), np.float32)
        for cell, amplitude in ((4, 2.2), (16, 1.25), (64, 0.6)):  # fine to coarse structure, like a photo
            coarse = rng.normal(0, 40, (h // cell + 2, w // cell + 2, 3)) + 128
            layer = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((w + 2 * cell, h + 2 * cell), 3)
            pixels += (np.asarray(layer, np.float32)[:h, :w] - 128) * amplitude
        pixels += rng.normal(0, 6, pixels.shape)  # sensor grain: what makes real JPEGs ~110 KB
        path = out / f"img_{i:05d}.jpg"
        Image.fromarray((pixels + 128).clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def reference_pipeline(image_size: int) -> Callable[[Path], tuple[torch.Tensor, torch.Tensor]]:
    """The reference's per-image work: decode, one crop + flip, two colour views (torchvision, global RNG)."""
    crop = T.Compose([T.RandomResizedCrop(image_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip()])
    color = T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def run(path: Path):
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        c = crop(image)
        return color(c), color(c)

    return run


@contextlib.contextmanager
def one_core(cpu: int | None) -> Iterator[int | None]:
    """Pin this process to one core and torch to one thread for the block."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    chosen = cpu if cpu is not None else (min(affinity) if affinity else None)
    try:
        torch.set_num_threads(1)
        if affinity is not None and chosen is not None:
            os.sched_setaffinity(0, {chosen})
        yield chosen
    finally:
        torch.set_num_threads(threads)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def _time_per_image(fn: Callable[[int], object], count: int, repeats: int) -> dict:
    """Best-of-`repeats` CPU and wall seconds per call of fn(i) over i in range(count)."""
    fn(0)  # warm-up: first-call allocations and imports
    cpu_best, wall_best = float("inf"), float("inf")
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(count):
            fn(i)
        cpu_best = min(cpu_best, (time.process_time() - cpu0) / count)
        wall_best = min(wall_best, (time.perf_counter() - wall0) / count)
    return {"cpu_ms": 1e3 * cpu_best, "wall_ms": 1e3 * wall_best, "img_per_s_per_core": 1.0 / cpu_best}


def _device_colour_cost(image_size: int, batch: int, device: str, repeats: int) -> dict:
    """Seconds per image of making both colour views of a uint8 crop batch on `device`."""
    generator = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    sample = make_pretrain_transform("color", image_size, color_on_device=True)
    params = default_collate([sample(Image.new("RGB", (8, 8)), generator).color for _ in range(batch)])
    crops, params = crops.to(device), params.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    color_views(crops, params)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        color_views(crops, params)
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"device": device, "batch": batch, "ms_per_image": 1e3 * best / batch, "img_per_s": batch / best}


def run(
    num_images: int = 64,
    image_size: int = 224,
    repeats: int = 3,
    cpu: int | None = None,
    workdir: str | os.PathLike | None = None,
    device_batch: int = 64,
) -> dict:
    """Measure the pipelines on `num_images` generated JPEGs; return a dict of per-image costs and ratios.

    Keys: "reference", "color_cpu" (our CPU colour path, same output as the reference), "crop_only" (the
    CPU part of the device-colour path, including batch collation), "decode_only"; each with cpu_ms,
    wall_ms, img_per_s_per_core. "device_colour": the batched colour ops' cost on this machine's CPU
    (with all its threads) and on CUDA when present. "speedup_crop_only_vs_reference": CPU-cost ratio.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="input_bench_"))
        folder = Path(workdir) / "jpegs"
        paths = sorted(folder.glob("class_0/*.jpg"))[:num_images]
        if len(paths) < num_images:
            paths = write_jpegs(folder, num_images)
        sizes = [p.stat().st_size for p in paths]
        color_cpu = ImageFolderDataset(folder, make_pretrain_transform("color", image_size), use_cache=False)
        crop_only = ImageFolderDataset(
            folder, make_pretrain_transform("color", image_size, color_on_device=True), use_cache=False
        )
        color_samples, crop_samples = SeededSamples(color_cpu, seed=0), SeededSamples(crop_only, seed=0)
        reference = reference_pipeline(image_size)

        def crop_batchwise(i: int) -> None:
            # Per-image share of a whole batch: decode + crop + flip + params, and the collate into one batch.
            if i % device_batch == 0:
                end = min(i + device_batch, num_images)
                default_collate([crop_samples[SampleKey(0, j)] for j in range(i, end)])

        results: dict = {
            "files": {"count": num_images, "size": "500x375", "mean_kb": float(np.mean(sizes)) / 1e3},
            "image_size": image_size,
        }
        with one_core(cpu) as core:
            results["core"] = core
            results["reference"] = _time_per_image(lambda i: reference(paths[i]), num_images, repeats)
            results["color_cpu"] = _time_per_image(lambda i: color_samples[SampleKey(0, i)], num_images, repeats)
            results["crop_only"] = _time_per_image(crop_batchwise, num_images, repeats)
            results["decode_only"] = _time_per_image(lambda i: crop_only.load(i, as_tensor=True), num_images, repeats)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        results["device_colour"] = [_device_colour_cost(image_size, device_batch, d, repeats) for d in devices]
        results["speedup_crop_only_vs_reference"] = results["reference"]["cpu_ms"] / results["crop_only"]["cpu_ms"]
        results["torch_threads_for_device_colour_cpu"] = torch.get_num_threads()
        return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(), indent=2))
