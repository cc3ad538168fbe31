"""The reference linear probe, exactly resumable.

Frozen encoder in eval mode (teacher by default); feature = un-normed [cls] output of the class-attention
blocks; head SyncBatchNorm(affine=False, eps 1e-5: statistics of the global batch) -> Linear (N(0, 0.01)
weight, zero bias); SGD momentum 0.9 without weight decay, lr 0.1 x batch / 256 with a per-step warm-up +
cosine; RandomResizedCrop + flip for train, resize + center crop for val; top-1 / top-5. The encoder's
weights are fingerprinted before and after training, and a difference is an error.

Accumulation (`accum_steps`): each rank still loads its batch_size / ranks images per step, and only the frozen
backbone's forward runs in the plan's micro-batches (without gradients); their features are concatenated and
the head takes one SGD step on the rank's whole batch. Its BatchNorm (GlobalBatchNorm1d, the global batch's
statistics) therefore sees exactly the batch it sees without accumulation, the head's gradient is the
full-batch one, and there is no gradient all-reduce to hold back on micro-steps (no `no_sync`): only the
backbone's activation memory shrinks, which is what the micro-batches are for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from extrema.batching import split_batch
from extrema.config.evaluation import LinearProbeConfig
from extrema.data import make_eval_transform
from extrema.distributed import is_distributed
from extrema.engine.accuracy import topk_correct
from extrema.engine.base import StopRequested, run_length
from extrema.engine.checkpointed import run_checkpoints
from extrema.engine.eval_data import open_splits, sum_over_ranks, train_loader, val_batches
from extrema.engine.eval_weights import build_encoder, load_probe_backbone, weights_digest
from extrema.engine.evaluation_run import EvaluationRun
from extrema.engine.logbook import Logbook
from extrema.engine.state_parts import Pinned, RankStreams, Record, Stateful
from extrema.models.frozen import FrozenFeatures
from extrema.models.probe_head import PROBE_BN_EPS, build_probe_head
from extrema.optim import apply_schedule
from extrema.precision import autocast
from extrema.rng import capture_rng_state, restore_rng_state, seed_everything
from extrema.schedules import LrSchedule, scaled_lr
from extrema.tasks import LINPROBE

log = logging.getLogger(__name__)


class LinearProbeTrainer(EvaluationRun):
    """Trains the probe head on frozen features; follows the Trainer protocol of `extrema.engine.base`."""

    task = LINPROBE

    def __init__(self, cfg: LinearProbeConfig, run_dir: str | Path) -> None:
        self._open(cfg, run_dir)  # the batch split first: an impossible one fails before any weights are read

        seed_everything(cfg.run.seed)  # the same encoder init (baseline) and head init on every rank
        encoder = build_encoder(cfg.model, drop_path_rate=0.0)
        self.weights = load_probe_backbone(encoder, cfg.checkpoint, cfg.branch)
        self.features = FrozenFeatures(encoder).to(self.device)
        self.backbone_digest = weights_digest(self.features)

        size = cfg.model.img_size
        self.splits = open_splits(cfg.data, make_eval_transform("train", size), make_eval_transform("val", size))
        self.head = build_probe_head(encoder.embed_dim, self.splits.num_classes).to(self.device)
        # The BN's statistics are the global batch's on every rank, so its buffers agree without a broadcast.
        self.net: nn.Module = (
            DistributedDataParallel(self.head, broadcast_buffers=False) if is_distributed() else self.head
        )
        self.peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)
        self.optimizer = torch.optim.SGD(
            self.head.parameters(), lr=self.peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.batch_plan = self._measured_plan()
        log.info("%s: %s", self.task, self.batch_plan)
        self.loader = train_loader(self.splits.train, self.batch_plan.per_rank, self.dist, cfg.data, cfg.run.seed)
        self.steps_per_epoch = self.loader.steps_per_epoch
        schedule_steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = run_length(schedule_steps, cfg.run.max_steps)
        # Per-step warm-up + cosine of the peak lr (the reference adjusts the lr every iteration); the SGD's
        # weight decay stays the configured constant.
        self.lr_schedule = LrSchedule.in_epochs(
            self.steps_per_epoch, cfg.epochs, cfg.warmup_epochs, peak_lr=self.peak_lr, min_lr=cfg.min_lr
        )
        self.step = 0
        self.wall_time = 0.0
        self.ckpts = run_checkpoints(self.run_dir, cfg.run)
        self.logbook = Logbook(self.run_dir, self.dist.is_main, self.total_steps, self.task)

    def _trial_step(self, micro_batch: int) -> None:
        """The frozen backbone's forward on `micro_batch` blank images (no gradient, no state, no random draw)."""
        size = self.cfg.model.img_size
        self.extract(torch.zeros(micro_batch, 3, size, size, device=self.device))

    # ---- one step ---------------------------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, D) float32 of a batch of images (B, 3, H, W)."""
        with autocast(self.cfg.run.precision, self.device):
            return self.features(images.to(self.device, non_blocking=True)).float()

    def train_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, D) of a rank's training batch (B, 3, H, W), extracted in the plan's micro-batches.
        The backbone is in eval mode and each image's feature is its own, so they equal one forward of the batch
        (up to the kernels' summation order)."""
        return torch.cat([self.extract(images[rows]) for rows in split_batch(self.batch_plan, images.shape[0])])

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """One SGD step of the head on a rank's batch of images (B, 3, H, W) and labels (B,): features in
        micro-batches, then one head step on all B of them (see the module docstring)."""
        return self.head_step(self.train_features(images), labels.to(self.device, non_blocking=True))

    def head_step(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """One SGD step of the head on features (B, D) at the current step's lr."""
        lr = apply_schedule(self.optimizer, self.lr_schedule, self.step)
        self.net.train()
        loss = nn.functional.cross_entropy(self.net(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.detach(), "lr": lr}

    # ---- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """top-1 / top-5 (%) of the head on val; each rank scores its share, counts are summed."""
        self.head.eval()
        counts = {"top1": 0.0, "top5": 0.0, "n": 0.0}
        for images, labels in val_batches(
            self.splits.val, self.cfg.eval_batch_size, self.dist, self.cfg.data.num_workers
        ):
            hits = topk_correct(self.head(self.extract(images)), labels.to(self.device))
            counts["top1"] += hits[1]
            counts["top5"] += hits[5]
            counts["n"] += labels.shape[0]
        counts = sum_over_ranks(counts, self.device)
        return {
            "top1": 100.0 * counts["top1"] / counts["n"],
            "top5": 100.0 * counts["top5"] / counts["n"],
            "val_images": int(counts["n"]),
        }

    # ---- the loop ------------------------------------------------------------------------------------------
    def _train(self, stop_requested: StopRequested) -> bool:
        """Train the head to the end of the schedule; the stop is polled at each epoch start and after each step."""
        return self.run_steps(
            self._loader_pass,
            lambda batch: self.train_step(batch["image"], batch["label"]),
            stop_requested,
            poll_at_pass_start=True,
        )

    def _on_step_end(self) -> None:
        """Every `eval_every_epochs` epochs, at the epoch's last step (the run's last one too): log val accuracy."""
        every = self.cfg.eval_every_epochs
        epoch, within = divmod(self.step, self.steps_per_epoch)
        if every and not within and epoch % every == 0:
            self.logbook.write(self.step, {f"val_{k}": v for k, v in self.evaluate().items()})

    def _finish(self) -> dict:
        results = self.evaluate()
        after = weights_digest(self.features)
        if after != self.backbone_digest:
            raise RuntimeError(
                f"the frozen backbone changed during the linear probe (sha256 {self.backbone_digest[:12]} -> "
                f"{after[:12]}): the probe is invalid"
            )
        self._bank_time()
        results["backbone_sha256"] = after
        results["backbone_unchanged"] = True
        results["step"] = self.step
        record = self._write_metrics(self._derived(), results)
        log.info("%s: top-1 %.2f%%, top-5 %.2f%%", self.task, results["top1"], results["top5"])
        return record

    def _derived(self) -> dict:
        return {
            "peak_lr": self.peak_lr,
            "batch": self.batch_plan.as_dict(),
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "feature": "un-normed [cls] after the class-attention blocks",
            "head": f"SyncBatchNorm(affine=False, eps={PROBE_BN_EPS}, global batch) -> Linear",
        }

    # ---- state -----------------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict[str, Stateful]:
        """Head, optimizer, loader position and RNG streams (the frozen backbone is only fingerprinted). The
        backbone's check comes before any part is restored; the streams come last, so that nothing restored after
        them can draw from them before the next step does."""
        return {
            "weights": Record(self.weights.as_dict()),
            "backbone_sha256": Pinned(self.backbone_digest, self._other_backbone),
            "head": self.head,
            "optimizer": self.optimizer,
            "loader": self.loader,
            "rng_per_rank": RankStreams(self.dist, capture_rng_state, restore_rng_state),
        }

    def _other_backbone(self, saved: str | None) -> str:
        return (
            f"this probe run started on other backbone weights (sha256 {str(saved)[:12]}, "
            f"now {self.backbone_digest[:12]} from {self.cfg.checkpoint}); use a new run folder for new weights"
        )
