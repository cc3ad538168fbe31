"""The final `metrics.json` of an evaluation: the numbers, and everything needed to reproduce them.

Users who cannot reproduce a number ask for the protocol, every hyperparameter, the data, the exact
weights, the hardware and the software; each record carries all of these.
"""

from __future__ import annotations

import dataclasses
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

import torch

from extrema.engine.base import FINAL_METRICS
from extrema.engine.summary import write_json

PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "extrema")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None when not installed)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["extrema"] is None:  # a source checkout that was not pip-installed
        import extrema

        versions["extrema"] = getattr(extrema, "__version__", None)
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return versions


def device_info(device: torch.device, world_size: int) -> dict:
    """Device type, name and how many processes (one device each) ran the evaluation."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "type": device.type,
        "name": name,
        "count": world_size,
        "cpu_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
    }


def dataset_info(name: str, root: str, train_size: int, val_size: int, classes: list[str]) -> dict:
    """Dataset name, where it was read, split sizes and classes."""
    return {
        "name": name,
        "root": str(root),
        "train_size": train_size,
        "val_size": val_size,
        "num_classes": len(classes),
        "classes_head": classes[:10],
    }


def write_eval_metrics(
    run_dir: str | Path,
    *,
    protocol: str,
    config: object,
    derived: dict,
    results: dict,
    dataset: dict,
    weights: dict,
    wall_time_s: float,
    device: torch.device,
    world_size: int,
    bad_images: int | None = None,
) -> dict:
    """Write run_dir/metrics.json atomically and return the record.

    config: the task's config dataclass (every hyperparameter, as given); derived: values computed from it
    (peak lr, per-rank batch, steps); results: the accuracies; weights: checkpoint path, branch, step.
    """
    record = {
        "protocol": protocol,
        "results": results,
        "hyperparameters": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "derived": derived,
        "dataset": dataset,
        "weights": weights,
        "wall_time_s": wall_time_s,
        "device": device_info(device, world_size),
        "packages": package_versions(),
    }
    if bad_images is not None:
        record["bad_images"] = bad_images  # unreadable training files met, each once, over all ranks
    write_json(Path(run_dir) / FINAL_METRICS, record)
    return record
