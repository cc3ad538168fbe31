"""The ExtreMA pretraining trainer: small, stateful, exactly resumable.

`fit()` (the run loop of `extrema.engine.run_loop`) loops `train_step()` over a resumable sampler; `state_dict()`
holds everything a resume needs (model, optimizer, scaler, counters, sampler position, every RNG stream of every
rank).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from extrema.batching import gradient_sync, split_batch
from extrema.checkpoint import CheckpointError, export_backbone, read_checkpoint
from extrema.checkpoint import model_state as checkpoint_model_state
from extrema.config import PretrainConfig
from extrema.data import ResumableLoader
from extrema.data.seeding import index_fingerprint
from extrema.distributed import all_reduce_sum, is_distributed
from extrema.engine.base import FINAL_METRICS, StopRequested, run_length
from extrema.engine.checkpointed import run_checkpoints
from extrema.engine.divergence import DivergenceGuard
from extrema.engine.logbook import Logbook, mean_over_ranks, read_metrics_log
from extrema.engine.pretrain_data import PretrainBatch, PretrainData
from extrema.engine.run_loop import RunLoop
from extrema.engine.state_parts import Functions, OptionalPart, RankStreams, Record, Stateful
from extrema.engine.summary import write_json
from extrema.masking import sample_masks
from extrema.models.siamese import ExtremaModel, create_model
from extrema.optim import apply_schedule, build_adamw
from extrema.precision import autocast, make_scaler
from extrema.rng import capture_rng_state, restore_generator, restore_rng_state, seed_everything
from extrema.schedules import LrSchedule, ema_momentum, scaled_lr
from extrema.tasks import PRETRAIN

log = logging.getLogger(__name__)


def model_args(cfg: PretrainConfig) -> dict:
    """Keyword arguments of `create_model` for this config (stored in checkpoints)."""
    # Every ModelConfig field is an argument of create_model (the encoder's name and geometry, the heads' widths).
    return {**dataclasses.asdict(cfg.model), "loss": cfg.loss, "temperature": cfg.temperature}


def initial_model(cfg: PretrainConfig) -> ExtremaModel:
    """The run's step-0 model (on the CPU): seeded by `run.seed` just before it is built, so that every rank, and
    the demo's random-init baseline, start from the same weights."""
    seed_everything(cfg.run.seed)
    return create_model(**model_args(cfg))


class PretrainTrainer(RunLoop):
    """ExtreMA pretraining on one process, or on every rank of a process group (DDP)."""

    task = PRETRAIN
    batch_keys = ("optim.batch_size", "optim.accum_steps")

    def __init__(self, cfg: PretrainConfig, run_dir: str | Path, data: PretrainData | None = None) -> None:
        self._open(cfg, run_dir)  # the split first, before the model and the data scan

        self.model: ExtremaModel = initial_model(cfg).to(self.device)  # identical on every rank
        seed_everything(cfg.run.seed + self.dist.rank)  # then per-rank streams (drop-path, ...)
        self.mask_generator = torch.Generator(self.device).manual_seed(cfg.run.seed * 7919 + self.dist.rank)

        self.data = data or PretrainData(cfg, self.dist, self.batch_plan.per_rank, self.device, self.run_dir)
        self.steps_per_epoch = self.data.steps_per_epoch
        schedule_steps = cfg.optim.epochs * self.steps_per_epoch
        self.total_steps = run_length(schedule_steps, cfg.run.max_steps)
        self.peak_lr = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
        o = cfg.optim  # AdamW's lr: warm-up + cosine of the scaled peak; its weight decay: a cosine
        self.lr_schedule = LrSchedule.in_epochs(
            self.steps_per_epoch,
            o.epochs,
            o.warmup_epochs,
            peak_lr=self.peak_lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
        )

        self.optimizer = build_adamw(
            self.model,
            lr=self.peak_lr,
            weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            skip=self.model.base_encoder.no_weight_decay(),
        )
        self.scaler = make_scaler(cfg.run.precision, self.device)
        self.batch_plan = self._measured_plan()
        log.info("%s: %s", self.task, self.batch_plan)
        self.net = self._wrap(self.model)
        self.step = 0  # optimizer steps done
        self.ckpts = run_checkpoints(self.run_dir, cfg.run)
        self.logbook = Logbook(self.run_dir, self.dist.is_main, self.total_steps, self.task)
        self.wall_time = 0.0  # seconds of training, summed over every attempt
        self.guard = DivergenceGuard(cfg.run.precision, cfg.run.max_skipped_steps)

    def _trial_step(self, micro_batch: int) -> None:
        """Forward + backward of `micro_batch` blank images, leaving no gradient or state behind: no optimizer step,
        and masks from a private generator and keep-every-path draws (no draw from the run's random streams)."""
        size = self.cfg.model.img_size
        views = torch.zeros(micro_batch, 3, size, size, device=self.device)
        keep = self._draw_masks(micro_batch, torch.Generator(self.device).manual_seed(0))
        depth = len(self.model.base_encoder.blocks)
        keep_all = torch.ones(keep.shape[0], micro_batch, depth, 2, device=self.device)
        self.model.train()
        with autocast(self.cfg.run.precision, self.device):
            out = self.model(views, views, keep, keep_all)
        self.scaler.scale(out["loss"]).backward()
        self.model.zero_grad(set_to_none=True)

    def _wrap(self, model: ExtremaModel) -> torch.nn.Module:
        net: torch.nn.Module = model
        if self.cfg.compile:
            # In place (Module.compile): parameter names and checkpoint keys stay the same.
            model.base_encoder.compile()
            model.momentum_encoder.compile()
        if is_distributed():
            # Only student parameters need gradients; the constant position table needs no broadcast.
            net = DistributedDataParallel(model, broadcast_buffers=False)
        return net

    # ---- schedules -------------------------------------------------------------------------------
    @property
    def epoch_float(self) -> float:
        return self.step / self.steps_per_epoch

    def ema_momentum(self, step: int) -> float:
        """The teacher's EMA momentum for the update that follows `step`. The reference updates the teacher before
        step t+1's forward with m(t+1); doing it right after step t with the same m is identical."""
        return ema_momentum((step + 1) / self.steps_per_epoch, self.cfg.optim.epochs, self.cfg.momentum)

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(
        self,
        student_view: torch.Tensor,
        teacher_view: torch.Tensor,
        keep: torch.Tensor | None = None,
        drops: torch.Tensor | None = None,
    ) -> dict:
        """One optimizer step + EMA update on a rank's batch of views (B, 3, H, W), in the plan's micro-steps.
        Returns scalar metrics.

        keep: (M, B, k) kept-token indices; drawn from the trainer's mask generator when not given.
        drops: (M, B, depth, 2) stochastic-depth draws; None = timm's DropPath draws (per micro-batch).
        """
        lr = apply_schedule(self.optimizer, self.lr_schedule, self.step)
        if keep is None:
            keep = self._draw_masks(student_view.shape[0])
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(self.batch_plan, student_view.shape[0])
        losses, teacher_embeddings = [], []
        for i, rows in enumerate(parts):
            # Gradients are all-reduced on the last micro-step only; each micro-loss is a mean over its rows, so
            # 1 / len(parts) of it makes the summed gradient the whole batch's mean-loss gradient.
            with gradient_sync(self.net, i == len(parts) - 1):
                with autocast(self.cfg.run.precision, self.device):
                    part_drops = None if drops is None else drops[:, rows]
                    out = self.net(student_view[rows], teacher_view[rows], keep[:, rows], part_drops)
                self.guard.observe(out["loss"])
                self.scaler.scale(out["loss"] / len(parts)).backward()
            losses.append(out["loss"].detach())
            teacher_embeddings.append(out["teacher_embedding"].detach())
        grad_norm = None
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.student_parameters(), self.cfg.optim.clip_grad)
        elif (self.step + 1) % self.cfg.run.log_every_steps == 0:
            self.scaler.unscale_(self.optimizer)  # only on logged steps: keeps the norm off the hot path
            grads = [p.grad for p in self.model.student_parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.scaler.step(self.optimizer)
        self.guard.update_scaler(self.scaler)  # scaler.update(), counting the steps fp16 skipped
        momentum = self.ema_momentum(self.step)
        self.model.update_teacher(momentum)
        metrics = {
            "loss": torch.stack(losses).mean(),
            "lr": lr,
            "weight_decay": self.lr_schedule.weight_decay_at(self.step),
            "momentum": momentum,
        }
        self.step += 1
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.detach()
        # Collapse check: spread of the normalised teacher embeddings across the rank's images (0 = collapsed).
        emb = torch.nn.functional.normalize(torch.cat(teacher_embeddings).float(), dim=-1)
        metrics["teacher_std"] = emb.std(dim=0).mean()
        return metrics

    def _draw_masks(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(M, B, k) keep-indices of the configured masks, from the trainer's mask stream unless given another."""
        m = self.cfg.mask
        num_tokens = self.model.base_encoder.num_tokens
        return sample_masks(
            batch, num_tokens, m.ratio, m.num_masks, self.mask_generator if generator is None else generator, m.disjoint
        )

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _train(self, stop_requested: StopRequested) -> bool:
        """Train to the end of the schedule. The stop is polled after each step only (after its save, and not after
        the last): the loader counts a batch as used once it has handed it out."""
        self._window = _LogWindow(self.step)
        return self.run_steps(
            lambda: self._window.timed(self.data.iterate(self.step)),
            self._batch_step,
            stop_requested,
            poll_at_pass_start=False,
        )

    def _batch_step(self, batch: PretrainBatch) -> dict:
        metrics = self.train_step(batch.student, batch.teacher, batch.keep, batch.drops)
        self._window.images += index_fingerprint(batch.indices)
        return metrics

    def _log_record(self, metrics: dict) -> dict:
        record = mean_over_ranks(metrics)  # all ranks' loss and teacher_std, not rank 0's
        record.update(epoch=round(self.epoch_float, 4), bad_images=self.data.bad_images())
        record.update(self._window.read(self.step, self.cfg.optim.batch_size))
        # The same images per step on any number of ranks give the same value (see the README).
        record["image_digest"] = self._sum_over_ranks(self._window.take_images())
        return record

    def _sum_over_ranks(self, value: int) -> int:
        return int(all_reduce_sum(torch.tensor([value], dtype=torch.int64, device=self.device)).item())

    def _finish(self) -> dict:
        """Export the backbones and write the run's summary (main rank)."""
        summary = {
            "task": self.task,
            "steps": self.step,
            "epochs": self.epoch_float,
            "wall_time_s": self.wall_time,
            "world_size": self.dist.world_size,
            "batch": self.batch_plan.as_dict(),
            "device": self.device.type,
            # Unreadable files met (each once), over all ranks: a collective, so before the main-rank-only part.
            "bad_images": int(all_reduce_sum(torch.tensor([self.data.bad_images()], device=self.device)).item()),
        }
        if self.dist.is_main:
            final = self.ckpts.latest_path()
            if final is not None:
                ckpt = read_checkpoint(final)
                for branch in ("teacher", "student"):
                    export_backbone(ckpt, self.run_dir / f"backbone_{branch}.pt", branch)
                summary["checkpoint"] = str(final)
            logged = [r for r in read_metrics_log(self.run_dir) if "loss" in r]
            if logged:
                summary["final_loss"] = logged[-1]["loss"]
            write_json(self.run_dir / FINAL_METRICS, summary)
        return summary

    # ---- state -------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict[str, Stateful]:
        """The model's recipe, then what an exact resume needs: weights before the optimizer (a checkpoint of another
        architecture fails on its weights, with the architecture named, before the optimizer's shapes), and every
        rank's random streams with its data position (see `_restore_streams`)."""
        return {
            "arch": Record(self.cfg.model.arch),
            "model_args": Record(model_args(self.cfg)),
            "model": Functions(self.model.state_dict, self._load_weights),
            "optimizer": self.optimizer,
            "scaler": OptionalPart(self.scaler),
            "rng_per_rank": RankStreams(self.dist, self._capture_streams, self._restore_streams, self._regroup_data),
        }

    def _capture_streams(self) -> dict:
        return {
            "global": capture_rng_state(),
            "mask": self.mask_generator.get_state(),
            "mask_device": self.mask_generator.device.type,  # a CPU state cannot drive a CUDA generator
            "data": self.data.state_dict(),
        }

    def _restore_streams(self, rng: dict) -> None:
        restore_rng_state(rng["global"])
        # Saved on another device type: a fresh stream for this rank and step, so the masks still differ by rank.
        reseed = (self.cfg.run.seed * 7919 + self.dist.rank) * 1_000_003 + self.step
        restore_generator(self.mask_generator, rng["mask"], rng.get("mask_device"), reseed)
        self.data.load_state_dict(rng["data"])

    def _regroup_data(self, per_rank: list[dict]) -> None:
        """On another number of ranks the data continue at the same global position, and every image keeps its
        masks, drop-path and augmentation draws (they are the image's own): each later step sees the images and
        draws it would have seen; only the summation order differs."""
        saved = [rank_streams["data"] for rank_streams in per_rank]
        self.data.load_state_dict(ResumableLoader.merge_rank_states(saved, with_bad_files=self.dist.is_main))

    def _load_weights(self, weights: dict) -> None:
        result = self.model.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint does not fit {self.cfg.model.arch}: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]} (was it written for another architecture?)"
            )

    def resume(self) -> bool:
        """Continue from the run's newest good checkpoint; else start from `init_from` if set."""
        if super().resume():
            return True
        if self.cfg.init_from:
            ckpt = read_checkpoint(self.cfg.init_from)
            self._load_weights(checkpoint_model_state(ckpt))
            log.info("initialised weights from %s (a new schedule starts at step 0)", self.cfg.init_from)
        return False


class _LogWindow:
    """What happened since the last logged step: img/s, data-wait time per step, and this rank's share of the
    fingerprint of the images used."""

    def __init__(self, step: int) -> None:
        self.start, self.step, self.data_time = time.perf_counter(), step, 0.0
        self.images = 0

    def timed(self, batches):
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.data_time += time.perf_counter() - t0
            yield batch

    def read(self, step: int, global_batch: int) -> dict:
        now = time.perf_counter()
        steps = max(step - self.step, 1)
        out = {"img_per_s": steps * global_batch / max(now - self.start, 1e-9), "data_time": self.data_time / steps}
        self.start, self.step, self.data_time = now, step, 0.0
        return out

    def take_images(self) -> int:
        images, self.images = self.images, 0
        return images
