"""What the evaluations' trainers share (linear probe, fast probe, finetune): they end in a metrics.json, and a run
that already wrote it for its last step reports it instead of training again."""

from __future__ import annotations

from typing import Any

import torch

from extrema.distributed import all_reduce_sum
from extrema.engine.metrics_record import dataset_info, write_eval_metrics
from extrema.engine.run_loop import RunLoop
from extrema.engine.summary import read_final_metrics


class EvaluationRun(RunLoop):
    """A RunLoop that ends in an evaluation's metrics.json.

    The trainer also sets `task` (written as the record's `protocol`), `cfg` (with `.data`, `.batch_size`,
    `.accum_steps`), `splits` (EvalSplits) and `weights` (WeightsSource).
    """

    cfg: Any
    splits: Any
    weights: Any

    def _finished_metrics(self) -> dict | None:
        """The final metrics of a run that already finished at this step (a requeue reports, never redoes)."""
        record = read_final_metrics(self.run_dir) if self.step >= self.total_steps else None
        if record is None:
            return None
        return record if record.get("results", {}).get("step") == self.step else None

    def _loader_pass(self) -> Any:
        """The training loader, set to the current step's epoch (it resumes mid-epoch at its saved position)."""
        self.loader.set_epoch(self.step // self.steps_per_epoch)
        return self.loader

    def _write_metrics(self, derived: dict, results: dict) -> dict:
        """Write metrics.json (main rank) and return its record; the other ranks return the results only."""
        loader = getattr(self, "loader", None)  # the training images' loader (the fast probe reads a feature cache)
        bad = None
        if loader is not None and hasattr(loader, "bad_files"):  # a collective: every rank gets here
            bad = int(all_reduce_sum(torch.tensor([len(loader.bad_files)], device=self.device)).item())
        if not self.dist.is_main:
            return {"results": results}
        data, splits = self.cfg.data, self.splits
        return write_eval_metrics(
            self.run_dir,
            protocol=self.task,
            config=self.cfg,
            derived=derived,
            results=results,
            dataset=dataset_info(data.name, data.root, len(splits.train), len(splits.val), splits.classes),
            weights=self.weights.as_dict(),
            wall_time_s=self.wall_time,
            device=self.device,
            world_size=self.dist.world_size,
            bad_images=bad,
        )
