"""Scan an ImageFolder tree once and cache the file list on disk.

ImageNet-22K holds 14M files on network storage: listing them takes many minutes, and a requeued job
must not pay that again. The first scan writes the list to a cache file keyed by the folder's absolute
path; later constructions load it and only `stat` the directories that were scanned (22K of them, not
14M files). Any directory whose mtime changed (a file added, removed or renamed inside it) invalidates
the cache and triggers a fresh scan.

The list is held as three NumPy arrays (one byte blob of relative paths, their offsets, their labels)
rather than a Python list of tuples: DataLoader workers are forked, and touching millions of Python
objects would copy every page of them into each worker (refcount writes), numpy buffers are not touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT_VERSION = 1
EXPECTED_LAYOUT = (
    "expected an ImageFolder layout: one sub-folder per class holding that class's images, e.g.\n"
    "  <data_root>/train/<class_a>/xxx.jpg\n"
    "  <data_root>/train/<class_b>/yyy.jpg\n"
    "  <data_root>/val/<class_a>/zzz.jpg"
)


@dataclass(frozen=True)
class FileList:
    """The images of one ImageFolder tree, in a fixed order (classes sorted, files sorted within a class)."""

    classes: tuple[str, ...]
    """Class folder names, sorted; label i is classes[i]."""
    blob: np.ndarray
    """uint8 (total_bytes,): paths relative to the root (file-system encoding), concatenated."""
    offsets: np.ndarray
    """int64 (num_files + 1,): path i is blob[offsets[i]:offsets[i + 1]]."""
    labels: np.ndarray
    """int32 (num_files,): class index of each file."""
    dir_mtimes: dict[str, int]
    """mtime_ns of the root ("") and of every scanned directory (relative path) at scan time."""

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, index: int) -> str:
        """Path of file `index` relative to the root."""
        return os.fsdecode(bytes(self.blob[self.offsets[index] : self.offsets[index + 1]]))


def default_cache_dir() -> Path:
    """$EXTREMA_CACHE_DIR/filelists, else $XDG_CACHE_HOME/extrema/filelists, else ~/.cache/extrema/filelists."""
    if os.environ.get("EXTREMA_CACHE_DIR"):
        return Path(os.environ["EXTREMA_CACHE_DIR"]) / "filelists"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "extrema" / "filelists"


def cache_path_for(root: Path, cache_dir: Path, extensions: tuple[str, ...]) -> Path:
    """Cache file of one folder: readable prefix + hash of the absolute root and the extension set."""
    key = json.dumps([str(root), sorted(extensions), CACHE_FORMAT_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = "_".join(root.parts[-2:]).replace(os.sep, "_") or "root"
    return cache_dir / f"{readable}-{digest}.npz"


def load_or_scan(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    extensions: tuple[str, ...] = IMG_EXTENSIONS,
    use_cache: bool = True,
) -> tuple[FileList, bool]:
    """Return (file list of `root`, whether it came from the cache). Scans and (re)writes the cache on a miss."""
    root = Path(root).absolute()
    check_root(root)
    extensions = tuple(e.lower() for e in extensions)
    cache_file = cache_path_for(root, Path(cache_dir) if cache_dir else default_cache_dir(), extensions)
    if use_cache:
        cached = _read_cache(cache_file, root)
        if cached is not None:
            return cached, True
    files = scan(root, extensions)
    if use_cache:
        _write_cache(cache_file, root, files)
    return files, False


def check_root(root: Path) -> None:
    """Raise a ValueError that shows the expected layout when `root` is missing or not a folder."""
    if not root.exists():
        raise ValueError(f"image folder {root} does not exist; {EXPECTED_LAYOUT}")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is a file, not a folder; {EXPECTED_LAYOUT}")


def scan(root: Path, extensions: tuple[str, ...]) -> FileList:
    """List every image under root/<class>/ (recursively, following links), in a deterministic order."""
    # Each directory's mtime is read *before* it is listed: a file added mid-scan then always invalidates.
    dir_mtimes = {"": root.stat().st_mtime_ns}
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [e.name for e in os.scandir(root) if e.is_file()][:3]
        found = f" (it holds files such as {loose} but no class sub-folders)" if loose else " (it is empty)"
        raise ValueError(f"no class folders in {root}{found}; {EXPECTED_LAYOUT}")
    if set(classes) >= {"train", "val"}:
        raise ValueError(
            f"{root} holds train/ and val/: it looks like the dataset root, not one split; pass {root / 'train'} "
            f"(or use split_root(data_root, 'train')); {EXPECTED_LAYOUT}"
        )
    paths: list[bytes] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = sorted(_walk_images(root, name, extensions, dir_mtimes))
        if not found:
            empty.append(name)
        paths.extend(os.fsencode(p) for p in found)
        labels.extend([label] * len(found))
    if empty:
        raise ValueError(
            f"class folders without any image ({', '.join(extensions)}) in {root}: {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''}; remove them or add images; {EXPECTED_LAYOUT}"
        )
    lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(paths), dtype=np.uint8).copy()
    logger.info("scanned %s: %d images in %d classes", root, len(paths), len(classes))
    return FileList(tuple(classes), blob, offsets, np.asarray(labels, dtype=np.int32), dir_mtimes)


def _walk_images(root: Path, rel_dir: str, extensions: tuple[str, ...], dir_mtimes: dict[str, int]) -> list[str]:
    # Iterative walk of one class folder; records each directory's mtime for the cache check.
    found = []
    pending = [rel_dir]
    visited: dict[tuple[int, int], str] = {}
    while pending:
        rel = pending.pop()
        full = root / rel
        stat = full.stat()
        seen_as = visited.setdefault((stat.st_dev, stat.st_ino), rel)
        if seen_as != rel:  # a symlink back to a folder already listed would be walked forever
            raise ValueError(
                f"{root / rel} is the folder {root / seen_as} again (a symlink loop): remove the link or point it "
                "at a folder outside the dataset"
            )
        dir_mtimes[rel] = stat.st_mtime_ns
        with os.scandir(full) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                # The name is tested first: where the file system gives no entry type (some network file
                # systems), is_dir() costs a stat, and 14M of them is what this module exists to avoid.
                if entry.name.lower().endswith(extensions):
                    found.append(f"{rel}/{entry.name}")
                elif entry.is_dir():  # follows symlinks, as torchvision's ImageFolder does
                    pending.append(f"{rel}/{entry.name}")
    return found


def _read_cache(cache_file: Path, root: Path) -> FileList | None:
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            blob, offsets, labels = data["blob"], data["offsets"], data["labels"]
    except (OSError, ValueError, KeyError) as err:
        logger.warning("file-list cache %s is unreadable (%s); rescanning %s", cache_file, err, root)
        return None
    if meta.get("version") != CACHE_FORMAT_VERSION or meta.get("root") != str(root):
        return None
    changed = _changed_dir(root, meta["dir_mtimes"])
    if changed is not None:
        logger.info("%s changed since its file list was cached (%s); rescanning", root, changed)
        return None
    logger.info("file list of %s loaded from %s (%d images)", root, cache_file, len(labels))
    return FileList(tuple(meta["classes"]), blob, offsets, labels, meta["dir_mtimes"])


def _changed_dir(root: Path, dir_mtimes: dict[str, int]) -> str | None:
    # Only directories are stat-ed: adding, removing or renaming a file updates its parent's mtime.
    for rel, mtime in dir_mtimes.items():
        try:
            now = (root / rel).stat().st_mtime_ns
        except OSError:
            return f"{root / rel} is gone"
        if now != mtime:
            return f"{root / rel} was modified"
    return None


def _write_cache(cache_file: Path, root: Path, files: FileList) -> None:
    meta = {
        "version": CACHE_FORMAT_VERSION,
        "root": str(root),
        "classes": list(files.classes),
        "dir_mtimes": files.dir_mtimes,
    }
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                blob=files.blob,
                offsets=files.offsets,
                labels=files.labels,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)  # atomic: ranks scanning at once never see half a file
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        logger.warning("could not write the file-list cache %s (%s); the next run will scan again", cache_file, err)
