"""The fast probe: an estimate of the linear probe from features extracted once, plus a head grid and kNN.

The frozen encoder runs once per image instead of once per image per epoch (90x fewer forward passes at the
published 90 epochs). Each train image is seen through one view drawn as the linear probe draws its train
views (RandomResizedCrop + flip, seeded by the image), so the head that uses the linear probe's own settings
(BN head, its lr and schedule) estimates the protocol's number: that head's val accuracy is the fast probe's
`top1`. Training on centre crops instead (`train_view=center`) matches val's view and reads several points
higher than the protocol. One pass over the cache trains a whole grid of heads (lrs x with/without the BN)
at once; the best of them on a split held out from train (val never chooses) is reported as `best`, a bound
on what a tuned probe could read. kNN (k=20, cosine similarity, exp(sim / T) votes, as DINO) runs on the
cache too.

Stages, each resumable: extract train -> extract val (memory-mapped files in run_dir/features, flushed
every `run.save_every_steps` batches) -> train the heads (step checkpoints) -> choose, evaluate, kNN.

With W ranks, each rank extracts a contiguous block of the train rows (`shard_bounds`) and keeps only that
block, on its device (1/W of the train features: 246 MB of fp16 ViT-B features at ImageNet-1K and 8 ranks),
plus all of val (77 MB), which every rank's kNN queries. The cache is read block by block straight into the
device tensors, so no whole host copy is ever made. The head grid trains data-parallel over those blocks: the
global batch is the one a single process would draw (a function of seed and step), each rank computes the
grid on the batch's rows it holds, the BN takes the global batch's statistics and the gradients are summed
over the ranks, so all ranks make the same update and take the same number of steps. Data-parallel rather
than training on one rank: one rank would need the whole train set and the others would sit in a collective
for the whole training (minutes at ImageNet scale, against the process group's timeout) while stop requests
and checkpoints, collective today, would need a protocol of their own; sharding the heads instead would need
each batch's rows gathered on every rank and the grid gathered for every checkpoint and evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from extrema.config.evaluation import FastProbeConfig
from extrema.data import ImageFolderDataset, OneViewPerImage, make_eval_transform
from extrema.distributed import all_reduce_sum
from extrema.engine.accuracy import topk_correct
from extrema.engine.base import StopRequested, run_length
from extrema.engine.checkpointed import run_checkpoints
from extrema.engine.eval_data import EvalSplits, open_splits
from extrema.engine.eval_weights import build_encoder, load_probe_backbone, weights_digest
from extrema.engine.evaluation_run import EvaluationRun
from extrema.engine.feature_cache import FeatureCache, shard_bounds
from extrema.engine.head_grid import GridSGD, grid_loss, grid_topk_correct, sum_over_ranks_, with_protocol_head
from extrema.engine.knn import KNN_CHUNK, normalized_bank, sharded_knn_neighbours, vote
from extrema.engine.logbook import Logbook
from extrema.engine.state_parts import DictAttribute, Pinned, Record, Stateful
from extrema.models.frozen import FrozenFeatures
from extrema.models.head_grid import HeadGrid, HeadSpec, grid_specs
from extrema.optim import apply_schedule
from extrema.precision import autocast
from extrema.rng import seed_everything
from extrema.schedules import LrSchedule, scaled_lr
from extrema.tasks import FASTPROBE, LINPROBE

log = logging.getLogger(__name__)

FEATURE_DIR = "features"
TRAIN_VIEWS = {
    "protocol": "one RandomResizedCrop + flip view per image, seeded by the image (features extracted once)",
    "center": "resize + center crop (features extracted once, no augmentation)",
}


def holdout_split(num_rows: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows) of the train set: a seeded random split, each sorted."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(num_rows * fraction))
    if n_hold >= num_rows:
        raise ValueError(f"holdout_fraction={fraction} leaves no training rows out of {num_rows}")
    return order[n_hold:].sort().values, order[:n_hold].sort().values


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a function of (seed, epoch) only, so resuming needs no RNG state."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class FastProbeTrainer(EvaluationRun):
    """Feature cache + head grid + kNN; follows the Trainer protocol of `extrema.engine.base`.

    Its checkpoints hold the head grid only: the feature cache resumes by itself, shard by shard.
    """

    task = FASTPROBE
    batch_keys = None  # no batch split: each rank takes its rows of every global batch of cached features

    def __init__(self, cfg: FastProbeConfig, run_dir: str | Path) -> None:
        self._open(cfg, run_dir)

        seed_everything(cfg.run.seed)
        encoder = build_encoder(cfg.model, drop_path_rate=0.0)
        self.weights = load_probe_backbone(encoder, cfg.checkpoint, cfg.branch)
        self.features = FrozenFeatures(encoder).to(self.device)
        self.backbone_digest = weights_digest(self.features)
        # One feature per image, reused every epoch: val through its deterministic view, train through one view
        # drawn as the linear probe's (or val's view with train_view=center). kNN's bank is the train set through
        # val's view, as in DINO's protocol: a third cache when the heads train on protocol views.
        size = cfg.model.img_size
        centred = open_splits(cfg.data, make_eval_transform("val", size), make_eval_transform("val", size))
        sources = {"train": centred.train, "val": centred.val}  # extracted in this order
        if cfg.train_view == "protocol":
            sources["train"] = open_splits(cfg.data, make_eval_transform("train", size), None).train
            if cfg.knn:
                sources["train_center"] = centred.train
        self.splits = EvalSplits(sources["train"], sources["val"])
        self.knn_bank = "train_center" if "train_center" in sources else "train"
        self.dim, self.num_classes = encoder.embed_dim, self.splits.num_classes
        self.caches = {
            name: FeatureCache(self.run_dir / FEATURE_DIR, name, self._fingerprint(name, dataset), self.dist)
            for name, dataset in sources.items()
        }
        self.sources = sources

        self.specs = with_protocol_head(grid_specs(cfg.lrs, cfg.batchnorm), cfg.protocol_lr)
        self.protocol_index = self.specs.index(HeadSpec(cfg.protocol_lr, True))
        self.grid = HeadGrid(self.dim, self.num_classes, self.specs, torch.Generator().manual_seed(cfg.run.seed))
        self.grid.to(self.device)
        peak_lrs = torch.tensor([scaled_lr(s.base_lr, cfg.batch_size) for s in self.specs], device=self.device)
        self.optimizer = GridSGD(self.grid, cfg.momentum, peak_lrs)

        self.fit_rows, self.holdout_rows = holdout_split(len(self.splits.train), cfg.holdout_fraction, cfg.run.seed)
        self.train_bounds = shard_bounds(len(self.splits.train), self.dist.rank, self.dist.world_size)
        """Rows [start, stop) of train that this rank extracts and holds (its cache block)."""
        self.steps_per_epoch = len(self.fit_rows) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={cfg.batch_size} exceeds the {len(self.fit_rows)} training rows left after the "
                f"holdout; lower batch_size"
            )
        schedule_steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = run_length(schedule_steps, cfg.run.max_steps)
        # The linear probe's schedule as a factor of each head's peak lr (the optimizer's per-head lr_scale).
        self.lr_schedule = LrSchedule.in_epochs(self.steps_per_epoch, cfg.epochs, cfg.warmup_epochs, peak_lr=1.0)
        self.step = 0
        self.wall_time = 0.0
        self.timing: dict[str, float] = {}
        self.ckpts = run_checkpoints(self.run_dir, cfg.run)
        self.logbook = Logbook(self.run_dir, self.dist.is_main, self.total_steps, self.task)

    def _fingerprint(self, name: str, dataset: ImageFolderDataset) -> dict:
        classes = hashlib.sha256("\n".join(dataset.classes).encode()).hexdigest()
        return {
            "backbone_sha256": self.backbone_digest,
            "num_rows": len(dataset),
            "dim": self.dim,
            "dtype": self.cfg.feature_dtype,
            "view": self.cfg.train_view if name == "train" else "center",
            "view_seed": self.cfg.run.seed,
            "img_size": self.cfg.model.img_size,
            "precision": self.cfg.run.precision,
            "classes_sha256": classes,
            "root": str(dataset.root),
        }

    # ---- stage 1: features ----------------------------------------------------------------------------------
    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg.run.precision, self.device):
            return self.features(images)

    def extract_features(self, stop_requested: StopRequested) -> bool:
        """Fill the feature caches (continuing a partial one); False if stopped on request."""
        for name, cache in self.caches.items():
            if cache.is_complete():
                continue
            start = time.perf_counter()
            done = cache.extract(
                OneViewPerImage(self.sources[name], self.cfg.run.seed),
                self._extract,
                self.device,
                self.cfg.extract_batch_size,
                self.cfg.data.num_workers,
                stop_requested,
                flush_every=self.cfg.run.save_every_steps,
            )
            self.timing[f"extract_{name}_s"] = self.timing.get(f"extract_{name}_s", 0.0) + time.perf_counter() - start
            if not done:
                return False
        return True

    # ---- stage 2: the head grid ----------------------------------------------------------------------------
    def head_step(self, features: torch.Tensor, labels: torch.Tensor, batch_rows: int | None = None) -> dict:
        """One SGD step of every head: features (b, D), labels (b,) are this rank's rows of a global batch of
        `batch_rows` rows (all of it, b, by default); a collective when distributed."""
        factor = apply_schedule(self.optimizer, self.lr_schedule, self.step)
        self.grid.train()
        loss = grid_loss(self.grid(features.float()), labels, batch_rows)
        self.optimizer.zero_grad()
        loss.backward()
        loss = loss.detach().reshape(1)
        # One all-reduce: each rank's grads hold its rows' share of the global mean, their sum is the whole.
        sum_over_ranks_([self.grid.weight.grad, self.grid.bias.grad, loss])
        self.optimizer.step()
        self.step += 1
        return {"loss": loss[0] / len(self.specs), "lr_factor": factor}

    def _epoch_batches(self, epoch: int) -> tuple[torch.Tensor, list[int]]:
        """This rank's rows of every batch of `epoch`, in this rank's block's numbering, and where each batch
        starts in them: batch i is rows[offsets[i] : offsets[i + 1]]. Host syncs once an epoch, never per step."""
        batch, (start, stop) = self.cfg.batch_size, self.train_bounds
        order = self.fit_rows[epoch_order(len(self.fit_rows), self.cfg.run.seed, epoch)]
        order = order[: self.steps_per_epoch * batch].to(self.device)  # global row ids, batch after batch
        mine = (order >= start) & (order < stop)
        offsets = [0, *mine.view(self.steps_per_epoch, batch).sum(dim=1).cumsum(0).tolist()]
        return order[mine] - start, offsets

    def train_heads(self, train_x: torch.Tensor, train_y: torch.Tensor, stop_requested: StopRequested) -> bool:
        """Train the grid to the end of the schedule on the fit rows; False if stopped on request (saved).

        train_x (N_r, D), train_y (N_r,): this rank's block of train, rows `self.train_bounds` (all of train in
        one process). Every rank takes every step, with its rows of the step's global batch (maybe none).
        The stop is polled before each step (at the pass start, then after each step but the last).
        """
        start = time.perf_counter()
        trained = self.run_steps(
            lambda: self._head_batches(train_x, train_y),
            lambda batch: self.head_step(*batch, self.cfg.batch_size),
            stop_requested,
            poll_at_pass_start=True,
        )
        if trained:
            self.timing["heads_s"] = self.timing.get("heads_s", 0.0) + time.perf_counter() - start
        return trained

    def _head_batches(self, train_x: torch.Tensor, train_y: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        """(features, labels) of this rank's rows of each remaining step's global batch, made when asked for."""
        rows, offsets, batches_epoch = None, [], -1
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            if epoch != batches_epoch:  # one permutation per epoch, not per step (ImageNet has 1.2M rows)
                rows, offsets = self._epoch_batches(epoch)
                batches_epoch = epoch
            mine = rows[offsets[position] : offsets[position + 1]]
            yield train_x[mine], train_y[mine]

    def _log_record(self, metrics: dict) -> dict:
        # The loss is summed over the ranks in the step already: no second collective.
        return {**{k: float(v) for k, v in metrics.items()}, "epoch": self.step / self.steps_per_epoch}

    # ---- stage 3: choose, evaluate, kNN --------------------------------------------------------------------
    def _held_out(self) -> torch.Tensor:
        """The held-out rows in this rank's block, numbered within the block."""
        start, stop = self.train_bounds
        rows = self.holdout_rows[(self.holdout_rows >= start) & (self.holdout_rows < stop)]
        return (rows - start).to(self.device)

    def evaluate_grid(self, train_x, train_y, val_x, val_y) -> dict:
        """Choose the head with the best held-out top-1; val top-1/top-5 of every head and of the chosen one.

        train_x, train_y: this rank's block of train (as `train_heads`); val_x, val_y: all of val. Each rank
        counts its held-out rows and its share of val; the counts are summed, so all ranks report the same.
        """
        rows = self._held_out()
        val_start, val_stop = shard_bounds(len(val_y), self.dist.rank, self.dist.world_size)
        chunk = max(self.cfg.batch_size, 1024)
        holdout = grid_topk_correct(self.grid, train_x[rows], train_y[rows], chunk, ks=(1,))[1]
        val = grid_topk_correct(self.grid, val_x[val_start:val_stop], val_y[val_start:val_stop], chunk)
        holdout, val_1, val_5 = (all_reduce_sum(c) for c in (holdout, val[1], val[5]))
        n_hold, n_val = len(self.holdout_rows), len(val_y)
        grid = [
            {
                "name": spec.name,
                "base_lr": spec.base_lr,
                "peak_lr": scaled_lr(spec.base_lr, self.cfg.batch_size),
                "batchnorm": spec.batchnorm,
                "holdout_top1": 100.0 * int(holdout[i]) / n_hold,
                "val_top1": 100.0 * int(val_1[i]) / n_val,
                "val_top5": 100.0 * int(val_5[i]) / n_val,
            }
            for i, spec in enumerate(self.specs)
        ]
        best = max(range(len(grid)), key=lambda i: (grid[i]["holdout_top1"], -i))  # ties: first in grid order
        return {
            "protocol_head": grid[self.protocol_index],
            "chosen": grid[best],
            "grid": grid,
            "holdout_size": n_hold,
            "fit_size": len(self.fit_rows),
        }

    @torch.no_grad()
    def evaluate_knn(self, train_x, train_y, val_x, val_y) -> dict:
        """kNN top-1/top-5 on val: every rank scores all of val against its own block of the bank (train_x,
        train_y: the rows this rank extracted) and the ranks merge their k best (see `sharded_knn_neighbours`).

        What it holds on the device at its peak, per rank (N_r train rows in the block, Q val rows, D dims,
        s bytes per cached value: 2 in fp16, W ranks, pairs of fp32 similarity + int64 label: 12 bytes): the
        train block and its normalised bank 2 N_r D s, val and its normalised queries 2 Q D s, the labels
        8 (N_r + Q), and the larger of: one chunk's similarities KNN_CHUNK N_r s beside the (Q, k) pairs so far
        12 Q k, or this rank's pairs, the W ranks' gathered and concatenated and the merged 12 Q k (2 W + 2).
        The README states it for ImageNet-1K.
        """
        start = time.perf_counter()
        embed = self.features.embed if self.cfg.knn_feature == "embedding" else None
        # The cache's dtype on a GPU (fp16 halves the bank); fp32 on a CPU, which has no fast fp16 matmul.
        dtype = train_x.dtype if train_x.is_cuda else torch.float32
        bank = normalized_bank(train_x, dtype, embed)  # (N_r, D)
        queries = normalized_bank(val_x, dtype, embed)  # (Q, D)
        sims, labels = sharded_knn_neighbours(bank, train_y, queries, self.cfg.knn_k, len(self.splits.train))
        del bank, queries
        hits = {1: 0, 5: 0}
        for s in range(0, len(val_y), KNN_CHUNK):  # vote by chunk: (Q, C) scores of all val at once are 200 MB
            scores = vote(
                sims[s : s + KNN_CHUNK], labels[s : s + KNN_CHUNK], self.num_classes, self.cfg.knn_temperature
            )
            for k, n in topk_correct(scores, val_y[s : s + KNN_CHUNK]).items():
                hits[k] += n
        self.timing["knn_s"] = time.perf_counter() - start
        return {
            "k": self.cfg.knn_k,
            "temperature": self.cfg.knn_temperature,
            "feature": self.cfg.knn_feature,
            "bank_view": "resize + center crop of every train image",
            "top1": 100.0 * hits[1] / len(val_y),
            "top5": 100.0 * hits[5] / len(val_y),
        }

    # ---- the loop ------------------------------------------------------------------------------------------
    def _train(self, stop_requested: StopRequested) -> bool:
        """Extract (or reuse) the features, then train the grid on them (`_finish` evaluates it)."""
        if not self.extract_features(stop_requested):
            return False
        train_x, train_y = self.caches["train"].load_own(self.device)  # this rank's block only
        val_x, val_y = self.caches["val"].load(self.device)  # all of val: every rank's kNN queries it
        if not self.train_heads(train_x, train_y, stop_requested):
            return False
        self._loaded = (train_x, train_y, val_x, val_y)  # handed to _finish, which lets go of them
        return True

    def _finish(self) -> dict:
        """Choose and evaluate the heads, run kNN, write metrics.json."""
        train_x, train_y, val_x, val_y = self._loaded
        del self._loaded  # held by the locals only from here, so that the kNN can free the train block
        results = self.evaluate_grid(train_x, train_y, val_x, val_y)
        # The headline is the estimate of the linear probe; the best-of-grid head is reported beside it.
        estimate = results["protocol_head"]
        results["top1"], results["top5"] = estimate["val_top1"], estimate["val_top5"]
        results["estimates"] = LINPROBE  # what `top1` / `top5` estimate
        if self.cfg.knn:
            bank_x, bank_y = train_x, train_y
            if self.knn_bank != "train":
                del train_x, train_y  # the heads are trained: only the kNN bank is needed now
                bank_x, bank_y = self.caches[self.knn_bank].load_own(self.device)  # this rank's shard of the bank
            results["knn"] = self.evaluate_knn(bank_x, bank_y, val_x, val_y)
        results["step"] = self.step
        results["timing"] = dict(self.timing)
        return self._report(results)

    def _report(self, results: dict) -> dict:
        self._bank_time()
        chosen = results["chosen"]
        log.info(
            "%s: linear-probe estimate (%s): val top-1 %.2f%%",
            self.task,
            self.specs[self.protocol_index].name,
            results["top1"],
        )
        log.info(
            "%s: best of the grid on the held-out rows %s (held-out top-1 %.2f%%): val top-1 %.2f%%",
            self.task,
            chosen["name"],
            chosen["holdout_top1"],
            chosen["val_top1"],
        )
        if "knn" in results:
            log.info("kNN (k=%d): val top-1 %.2f%%", self.cfg.knn_k, results["knn"]["top1"])
        derived = {
            "num_heads": len(self.specs),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "train_view": TRAIN_VIEWS[self.cfg.train_view],
            "feature": "un-normed [cls] after the class-attention blocks",
        }
        return self._write_metrics(derived, results)

    # ---- state -----------------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict[str, Stateful]:
        """The grid, its momentum buffers and the stage timings (batches are a function of seed and step); the
        backbone and the grid's heads must be those the run started with, checked before anything is restored."""
        return {
            "timing": DictAttribute(self, "timing"),
            "weights": Record(self.weights.as_dict()),
            "backbone_sha256": Pinned(
                self.backbone_digest,
                lambda saved: (
                    "this fast-probe run started on other backbone weights; use a new run folder for new weights"
                ),
            ),
            "specs": Pinned(
                [dataclasses.asdict(s) for s in self.specs],
                lambda saved: "this fast-probe run trained another grid (lrs / batchnorm); use a new run folder",
            ),
            "grid": self.grid,
            "optimizer": self.optimizer,
        }
