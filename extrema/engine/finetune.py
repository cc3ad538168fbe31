"""The BEiT-style finetune, built from timm parts, exactly resumable.

Model: the encoder without [cls] and class-attention blocks; mean-pooled patch tokens -> fc_norm -> Linear
(head scaled by 0.001 after init); drop-path 0.2. Optimiser: AdamW with layer-wise lr decay 0.65
(timm's `param_groups_layer_decay`, layers from `FinetuneViT.group_matcher`; torch's fused AdamW), lr scaled by global
batch / 256, timm's per-step warm-up + cosine to 1e-6. Data: timm's `create_transform` (RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic), timm's Mixup 0.8 / CutMix 1.0 with label smoothing
0.1 and SoftTargetCrossEntropy; evaluation without any of these, sharded over ranks. Optional timm
ModelEmaV3, evaluated alongside.

Accumulation (`accum_steps`): each rank loads batch_size / ranks images per AdamW step and runs them in the
plan's micro-steps; the update equals the one without accumulation. Mixup/CutMix mix the rank's whole batch
before it is split (the same pairs and lambda), each image's drop-path decisions come with it from the data
loader (its own seeded draws, not the global RNG's per batch), each micro-loss is scaled by 1 / micro-steps,
and DDP all-reduces the gradients on the last micro-step only. Clipping, the scaler, AdamW, the EMA and the lr
schedule act once per optimizer step, and `step` (logs, checks, checkpoints) counts optimizer steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from extrema.batching import gradient_sync, split_batch
from extrema.checkpoint import CheckpointError
from extrema.config.evaluation import FinetuneConfig
from extrema.data import IMAGENET_MEAN, IMAGENET_STD
from extrema.data.randaugment import keep_zero_bit_posterize
from extrema.data.sample_draws import StudentDraws
from extrema.distributed import is_distributed
from extrema.engine.accuracy import topk_correct
from extrema.engine.base import StopRequested, run_length
from extrema.engine.checkpointed import run_checkpoints
from extrema.engine.divergence import DivergenceGuard
from extrema.engine.eval_data import open_splits, sum_over_ranks, train_loader, val_batches
from extrema.engine.eval_weights import WeightsSource, build_encoder, load_protocol_weights, read_eval_weights
from extrema.engine.evaluation_run import EvaluationRun
from extrema.engine.logbook import Logbook
from extrema.engine.state_parts import DictAttribute, OptionalPart, RankStreams, Record, Stateful
from extrema.models.classifier import FINETUNE_DROPPED_KEYS, FINETUNE_NEW_KEYS, FinetuneViT
from extrema.optim import apply_schedule, fused_adamw
from extrema.precision import autocast, make_scaler
from extrema.rng import capture_rng_state, restore_rng_state, seed_everything
from extrema.schedules import LrSchedule, scaled_lr
from extrema.tasks import FINETUNE

log = logging.getLogger(__name__)


def finetune_transforms(cfg: FinetuneConfig) -> tuple:
    """timm's train transform (crop, flip, RandAugment, erasing) and eval transform (resize, center crop)."""
    common = {"input_size": cfg.model.img_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    train = create_transform(
        is_training=True,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
        **common,
    )
    keep_zero_bit_posterize(train)  # the reference policy reaches magnitude 10 (0-bit posterize)
    val = create_transform(is_training=False, interpolation="bicubic", crop_pct=cfg.crop_pct, **common)
    return train, val


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (it also smooths the labels), or None when mixing is off."""
    if not cfg.mixing:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: FinetuneConfig) -> nn.Module:
    """Soft-target CE with mixing (Mixup already smoothed the targets), else label-smoothing CE, else CE."""
    if cfg.mixing:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def load_finetune_weights(model: FinetuneViT, checkpoint: str | None, branch: str) -> WeightsSource:
    """Pretrained (or previously finetuned) weights into `model`, strict except the protocol's own keys:
    [cls], class-attention blocks and the final norm are dropped; fc_norm and head are new (a head for another
    number of classes is rebuilt, and logged)."""
    if checkpoint is None:
        log.warning("no checkpoint given: finetuning from a random init (a baseline)")
        return WeightsSource(None, None, "random")
    state, source = read_eval_weights(checkpoint, branch)
    load_protocol_weights(model, state, dropped=FINETUNE_DROPPED_KEYS, new=FINETUNE_NEW_KEYS, what="finetune model")
    return source


class FinetuneTrainer(EvaluationRun):
    """End-to-end finetuning; follows the Trainer protocol of `extrema.engine.base`."""

    task = FINETUNE

    def __init__(self, cfg: FinetuneConfig, run_dir: str | Path) -> None:
        self._open(cfg, run_dir)  # the batch split first: an impossible one fails before any weights are read
        per_rank = self.batch_plan.per_rank
        if cfg.mixing and per_rank % 2:  # the micro-batches may be odd: Mixup sees the whole per-rank batch
            raise ValueError(f"Mixup/CutMix pair images within a batch: batch per rank {per_rank} must be even")

        train_tf, val_tf = finetune_transforms(cfg)
        self.splits = open_splits(cfg.data, train_tf, val_tf)
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.model = FinetuneViT(
            build_encoder(cfg.model), self.splits.num_classes, cfg.head_init_scale, cfg.train_pos_embed
        )
        self.weights = load_finetune_weights(self.model, cfg.checkpoint, cfg.branch)
        self.model.to(self.device)
        seed_everything(cfg.run.seed + self.dist.rank)  # then per-rank streams: drop-path, Mixup's NumPy draws
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        # The model holds no buffers (the position embedding is a parameter), so there is nothing to broadcast
        # before every forward.
        self.net: nn.Module = (
            DistributedDataParallel(self.model, broadcast_buffers=False) if is_distributed() else self.model
        )

        self.peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)
        # timm's layer-decay groups (layer ids from FinetuneViT.group_matcher, no decay for no_weight_decay()),
        # under the fused AdamW.
        groups = param_groups_layer_decay(
            self.model,
            weight_decay=cfg.weight_decay,
            no_weight_decay_list=self.model.no_weight_decay(),
            layer_decay=cfg.layer_decay,
        )
        self.optimizer = fused_adamw(groups, lr=self.peak_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.scaler = make_scaler(cfg.run.precision, self.device)
        self.mixup = build_mixup(cfg, self.splits.num_classes)
        self.criterion = build_criterion(cfg)

        self.batch_plan = self._measured_plan()
        log.info("%s: %s", self.task, self.batch_plan)
        self.loader = train_loader(
            self.splits.train, per_rank, self.dist, cfg.data, cfg.run.seed, draws=self._image_draws()
        )
        self.steps_per_epoch = self.loader.steps_per_epoch
        schedule_steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = run_length(schedule_steps, cfg.run.max_steps)
        # Per optimizer step, times each group's layer-decay lr_scale; the groups keep their own weight decay. The
        # warm-up is a whole number of steps, as the reference's (BEiT's) per-iteration schedule has it.
        self.lr_schedule = LrSchedule(
            schedule_steps, round(cfg.warmup_epochs * self.steps_per_epoch), peak_lr=self.peak_lr, min_lr=cfg.min_lr
        )
        self.step = 0
        self.wall_time = 0.0
        self.guard = DivergenceGuard(cfg.run.precision, cfg.run.max_skipped_steps)
        self.best: dict = {}
        self.ckpts = run_checkpoints(self.run_dir, cfg.run)
        self.logbook = Logbook(self.run_dir, self.dist.is_main, self.total_steps, self.task)

    def _trial_step(self, micro_batch: int) -> None:
        """Forward + backward of `micro_batch` blank images in training mode, leaving no gradient or state behind:
        no optimizer step, and keep-every-path draws instead of DropPath's (no draw from the run's RNG)."""
        size = self.cfg.model.img_size
        images = torch.zeros(micro_batch, 3, size, size, device=self.device)
        keep_all = torch.ones(micro_batch, len(self.model.blocks), 2, device=self.device)
        self.model.train()
        with autocast(self.cfg.run.precision, self.device):
            logits = self.model(images, keep_all)
        self.scaler.scale(logits.float().logsumexp(dim=1).mean()).backward()
        self.model.zero_grad(set_to_none=True)

    def _image_draws(self) -> StudentDraws | None:
        """Per-image stochastic-depth draws for the loader when the model drops paths (else none): an image's
        drop decisions are then its own, the same in any micro-batch and on any number of ranks."""
        if self.cfg.model.drop_path_rate <= 0:
            return None
        return StudentDraws(depth=len(self.model.blocks))

    # ---- one step ---------------------------------------------------------------------------------------------
    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets: Mixup/CutMix images with soft (B, C) targets, or the batch unchanged."""
        if self.mixup is None:
            return images, labels
        return self.mixup(images, labels)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, drops: torch.Tensor | None = None) -> dict:
        """One AdamW step on a rank's batch (B, 3, H, W), labels (B,), in the plan's micro-steps; then the EMA update.

        drops: (B, depth, 2) per-image stochastic-depth draws (the loader's "draws"); None = timm's DropPath
        draws from the global RNG, per micro-batch.
        """
        apply_schedule(self.optimizer, self.lr_schedule, self.step)
        images = images.to(self.device, non_blocking=True)
        # The whole rank's batch is mixed before the split: the pairs and lambda are those without accumulation.
        images, targets = self.mix(images, labels.to(self.device, non_blocking=True))
        if drops is not None:
            drops = drops.to(self.device, non_blocking=True)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(self.batch_plan, images.shape[0])
        losses = []
        for i, rows in enumerate(parts):
            # Gradients are all-reduced on the last micro-step only; each micro-loss is a mean over its equal share
            # of rows, so 1 / len(parts) of it makes the summed gradient the whole batch's mean-loss gradient.
            with gradient_sync(self.net, i == len(parts) - 1):
                with autocast(self.cfg.run.precision, self.device):
                    logits = self.net(images[rows], None if drops is None else drops[rows])
                loss = self.criterion(logits.float(), targets[rows])
                self.guard.observe(loss)
                self.scaler.scale(loss / len(parts)).backward()
            losses.append(loss.detach())
        metrics = {"loss": torch.stack(losses).mean(), "lr": max(g["lr"] for g in self.optimizer.param_groups)}
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.guard.update_scaler(self.scaler)  # scaler.update(), counting the steps fp16 skipped
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return metrics

    # ---- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict:
        """top-1 / top-5 (%) and CE loss on val, no augmentation or mixing; ranks score disjoint shares."""
        model = model or self.model
        model.eval()
        counts = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "n": 0.0}
        for images, labels in val_batches(
            self.splits.val, self.cfg.eval_batch_size, self.dist, self.cfg.data.num_workers
        ):
            images, labels = images.to(self.device), labels.to(self.device)
            with autocast(self.cfg.run.precision, self.device):
                logits = model(images).float()
            hits = topk_correct(logits, labels)
            counts["top1"] += hits[1]
            counts["top5"] += hits[5]
            counts["loss"] += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            counts["n"] += labels.shape[0]
        counts = sum_over_ranks(counts, self.device)
        n = counts["n"]
        return {"top1": 100 * counts["top1"] / n, "top5": 100 * counts["top5"] / n, "loss": counts["loss"] / n}

    # ---- the loop -------------------------------------------------------------------------------------------------
    def _train(self, stop_requested: StopRequested) -> bool:
        """Train to the end of the schedule; the stop is polled at each epoch start and after each step."""
        return self.run_steps(
            self._loader_pass,
            lambda batch: self.train_step(batch["image"], batch["label"], batch.get("draws", {}).get("drops")),
            stop_requested,
            poll_at_pass_start=True,
        )

    def _on_step_end(self) -> None:
        """Every `eval_every_epochs` epochs, at the epoch's last step: log val accuracy and keep the best."""
        every = self.cfg.eval_every_epochs
        epoch, within = divmod(self.step, self.steps_per_epoch)
        if within or not every or epoch % every or self.step == self.total_steps:
            return  # the final evaluation happens in _finish
        self._record_eval(self.evaluate(), epoch)

    def _record_eval(self, val: dict, epoch: int) -> None:
        self.logbook.write(self.step, {f"val_{k}": v for k, v in val.items()})
        if val["top1"] > self.best.get("top1", -1.0):
            self.best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch, "step": self.step}

    def _finish(self) -> dict:
        results = self.evaluate()
        self._record_eval(results, self.step // self.steps_per_epoch)
        results["best_during_training"] = dict(self.best)  # chosen on val: reported, never the headline number
        if self.ema is not None:
            results["ema"] = self.evaluate(self.ema.module)
        results["step"] = self.step
        self._bank_time()
        log.info("%s: top-1 %.2f%%, top-5 %.2f%%", self.task, results["top1"], results["top5"])
        derived = {
            "peak_lr": self.peak_lr,
            "batch": self.batch_plan.as_dict(),
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "layer_lr_scales": sorted({round(g["lr_scale"], 8) for g in self.optimizer.param_groups}),
            "loss": type(self.criterion).__name__,
            "model": "patch tokens -> self-attention blocks -> mean pool -> fc_norm -> Linear (no [cls])",
        }
        return self._write_metrics(derived, results)

    # ---- state ------------------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict[str, Stateful]:
        """Model (loadable as a finetune init), EMA, optimizer, scaler, loader position, best metrics, every rank's
        RNGs. Weights before the optimizer (a model that does not fit fails on its keys, not on the optimizer's
        shapes); the streams last, so that nothing restored after them can draw from them before the next step does."""
        return {
            "arch": Record(self.cfg.model.arch),
            "weights": Record(self.weights.as_dict()),
            "classes": Record(list(self.splits.classes)),
            "model": self.model,
            "model_ema": OptionalPart(self.ema.module if self.ema is not None else None),
            "optimizer": self.optimizer,
            "scaler": OptionalPart(self.scaler),
            "loader": self.loader,
            "best": DictAttribute(self, "best"),
            "rng_per_rank": RankStreams(self.dist, capture_rng_state, restore_rng_state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` of this run (strict: the same model and classes)."""
        # Runs saved before the position embedding was trained have no such key and a fixed table.
        saved_train_pos = state.get("config", {}).get("train_pos_embed", False)
        if saved_train_pos != self.cfg.train_pos_embed:
            raise CheckpointError(
                f"this finetune run was started with train_pos_embed={saved_train_pos} and its optimizer state "
                f"holds {'' if saved_train_pos else 'no '}position embedding; continue it with "
                f"finetune.train_pos_embed={str(saved_train_pos).lower()}, or use a new run folder"
            )
        super().load_state_dict(state)
