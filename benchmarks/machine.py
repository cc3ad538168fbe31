"""What machine a benchmark ran on, how busy it was, and how much memory a process peaked at."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux, `platform` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """CPU feature flags (avx512f, amx_bf16, ...); empty where /proc/cpuinfo is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and SLURM narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none): other work skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit(repo: Path) -> str | None:
    """The checked-out commit (with `+dirty` when files differ), or None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cuda_devices() -> list[dict]:
    """Name, memory and compute capability of each visible CUDA device ([] without CUDA)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
        )
    return out


def machine_info(repo: Path | None = None) -> dict:
    """Everything the summary prints about where the numbers came from."""
    flags = cpu_flags()
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_features": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_devices": cuda_devices(),
        "cuda_version": torch.version.cuda if torch.cuda.is_available() else None,
        "packages": package_versions(),
        "git_commit": git_commit(repo) if repo else None,
        "python_executable": Path(sys.executable).name,
        "load_average": load_average(),
    }


# ---- peak memory of this process ---------------------------------------------------------------------------
# tracemalloc only sees Python allocations, not torch's: the kernel's high-water mark of the resident set is
# what a process really peaked at. Linux lets a process reset that mark (clear_refs "5"), so one process can
# measure one phase.


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """The resident set size now (MiB), or None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB): VmHWM, or getrusage's maxrss where /proc is missing."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if sys.platform == "darwin":
            kib //= 1024  # bytes on macOS
    return kib / 1024
