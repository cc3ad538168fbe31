"""Frozen features of a whole split, extracted once into memory-mapped .npy files, resumable mid-way.

Layout in the cache folder, per split (W ranks, each writing its own contiguous block of rows, so that no
two processes ever write to one file, which shared file systems do not always order):
    <split>.meta.json                       what the cache was made from (weights digest, sizes, dtype, W)
    <split>.<r>-of-<W>.features.npy         (rows_r, D) float16/float32
    <split>.<r>-of-<W>.labels.npy           (rows_r,) int64: the label of the image actually read
    <split>.<r>-of-<W>.progress.json        {"rows_done": n}, rewritten atomically after a flush
A cache made from other weights, data or world size is deleted and extracted again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from extrema.data.workers import ignore_stop_signals, iterate_workers
from extrema.distributed import DistInfo, any_rank, is_distributed

log = logging.getLogger(__name__)

READ_CHUNK = 65536
"""Rows read from a memory-mapped block at once (100 MB of fp16 ViT-B features)."""


def shard_bounds(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank`: contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class FeatureCache:
    """The cached features of one split. `extract` fills it (resumably); `load` reads it back whole,
    `load_own` only this rank's block."""

    def __init__(self, directory: str | Path, split: str, fingerprint: dict, dist_info: DistInfo) -> None:
        self.directory = Path(directory)
        self.split = split
        self.fingerprint = dict(fingerprint, world_size=dist_info.world_size)
        self.dist = dist_info
        self.num_rows = int(fingerprint["num_rows"])
        self.dim = int(fingerprint["dim"])
        self.dtype = np.dtype(fingerprint["dtype"])

    # ---- files --------------------------------------------------------------------------------------
    def _stem(self, rank: int) -> Path:
        return self.directory / f"{self.split}.{rank:03d}-of-{self.dist.world_size:03d}"

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.split}.meta.json"

    def _rows_done(self, rank: int) -> int:
        path = Path(f"{self._stem(rank)}.progress.json")
        return int(json.loads(path.read_text())["rows_done"]) if path.is_file() else 0

    def _write_progress(self, rows_done: int) -> None:
        path = Path(f"{self._stem(self.dist.rank)}.progress.json")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"rows_done": rows_done}))
        os.replace(tmp, path)

    def _prepare(self) -> None:
        """Rank 0 drops a cache made from anything else; then every rank sees the same files."""
        if self.dist.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            old = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
            if old != self.fingerprint:
                if old is not None:
                    log.warning(
                        "%s feature cache was made from other weights/data/world size: extracting again", self.split
                    )
                for path in self.directory.glob(f"{self.split}.*"):
                    path.unlink()
                self.meta_path.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
        if is_distributed():
            dist.barrier()

    def is_complete(self) -> bool:
        """Every rank's block is fully written for this fingerprint."""
        if not self.meta_path.is_file() or json.loads(self.meta_path.read_text()) != self.fingerprint:
            return False
        for r in range(self.dist.world_size):
            start, stop = shard_bounds(self.num_rows, r, self.dist.world_size)
            if self._rows_done(r) != stop - start:
                return False
        return True

    # ---- extraction -----------------------------------------------------------------------------------
    def extract(
        self,
        dataset: Dataset,
        features_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        batch_size: int,
        num_workers: int,
        stop_requested: Callable[[], bool],
        flush_every: int,
    ) -> bool:
        """Run `features_fn` (images (B, 3, H, W) -> (B, D)) over this rank's rows, continuing where a previous
        attempt flushed. Returns False when stopped early (progress is flushed), True when the split is done.

        All ranks step through the same number of batches (ranks with fewer rows idle at the end) so that
        the per-batch stop check, a collective, pairs up across ranks.
        """
        self._prepare()
        start, stop = shard_bounds(self.num_rows, self.dist.rank, self.dist.world_size)
        rows = stop - start
        stem = self._stem(self.dist.rank)
        mode = "r+" if Path(f"{stem}.features.npy").is_file() else "w+"
        feats = np.lib.format.open_memmap(f"{stem}.features.npy", mode, self.dtype, (rows, self.dim))
        labels = np.lib.format.open_memmap(f"{stem}.labels.npy", mode, np.int64, (rows,))

        total_batches = math.ceil(shard_bounds(self.num_rows, 0, self.dist.world_size)[1] / batch_size)
        done = math.ceil(self._rows_done(self.dist.rank) / batch_size)
        if is_distributed():  # restart all ranks from the least advanced one (rewritten rows are identical)
            t = torch.tensor([done], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            done = int(t.item())
        first_row = min(done * batch_size, rows)
        loader = DataLoader(
            Subset(dataset, range(start + first_row, stop)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # leaves the global RNG alone
            worker_init_fn=ignore_stop_signals,  # the job's stop signals are the training process's to handle
        )
        batches = iterate_workers(loader)
        row = first_row
        for b in range(done, total_batches):
            if any_rank(stop_requested(), device):
                self._flush(feats, labels, row)
                log.warning("%s feature extraction stopped at %d/%d rows of this rank", self.split, row, rows)
                return False
            if row < rows:
                images, targets = next(batches)
                out = features_fn(images.to(device, non_blocking=True))  # (B, D)
                n = out.shape[0]
                feats[row : row + n] = out.float().cpu().numpy().astype(self.dtype)
                labels[row : row + n] = targets.numpy()
                row += n
            if (b + 1) % flush_every == 0:
                self._flush(feats, labels, row)
        self._flush(feats, labels, row)
        if is_distributed():
            dist.barrier()
        return True

    def _flush(self, feats: np.memmap, labels: np.memmap, rows_done: int) -> None:
        feats.flush()
        labels.flush()
        self._write_progress(rows_done)

    # ---- reading -----------------------------------------------------------------------------------------
    def load(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of the split in order, on `device`: features (N, D) in the stored dtype, labels (N,) int64."""
        return self._read(range(self.dist.world_size), torch.device(device))

    def load_own(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's block only, rows `shard_bounds(num_rows, rank, world)` of the split, on `device`."""
        return self._read([self.dist.rank], torch.device(device))

    def _read(self, ranks, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_complete():
            raise RuntimeError(f"the {self.split} feature cache in {self.directory} is incomplete; run extract first")
        bounds = [shard_bounds(self.num_rows, r, self.dist.world_size) for r in ranks]
        rows = sum(stop - start for start, stop in bounds)
        dtype = torch.from_numpy(np.zeros(0, self.dtype)).dtype
        feats = torch.empty(rows, self.dim, dtype=dtype, device=device)
        labels = torch.empty(rows, dtype=torch.int64, device=device)
        offset = 0
        for r in ranks:
            stem = self._stem(r)
            block = np.load(f"{stem}.features.npy", mmap_mode="r")
            # Copied READ_CHUNK rows at a time from the memory map: the host never holds a whole block.
            for start in range(0, len(block), READ_CHUNK):
                part = torch.from_numpy(np.array(block[start : start + READ_CHUNK]))
                feats[offset + start : offset + start + len(part)] = part
            labels[offset : offset + len(block)] = torch.from_numpy(np.array(np.load(f"{stem}.labels.npy")))
            offset += len(block)
        return feats, labels
