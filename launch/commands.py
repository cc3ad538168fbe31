"""The launcher's submitting commands: one per task (named as in `extrema.tasks`) and the pipeline of them all.

Torch-free, so that the CLI can parse a command line without loading the training stack."""

from __future__ import annotations

from extrema.tasks import TASK_NAMES

PIPELINE = "pipeline"
"""Pretraining and its evaluations, each evaluation after the pretraining succeeded."""
SUBMIT_COMMANDS = (*TASK_NAMES, PIPELINE)
