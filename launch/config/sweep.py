"""Sweeps: `python -m launch pipeline -m pretrain.mask.ratio=0.8,0.9 pretrain.mask.num_masks=5,8`.

Hydra's multirun expands the comma-separated values; each member is its own experiment (named after the
swept values, e.g. `tiny_ratio0.9_num_masks8`) that runs its own command. Members run through Hydra's
launcher: the basic one (one after the other, in this process) by default, or hydra-submitit-launcher's
`hydra/launcher=submitit_local` / `submitit_slurm`, which runs each member's command as a job.
"""

from __future__ import annotations

import sys
import tempfile

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig
from rich.console import Console

from launch.commands import PIPELINE
from launch.config.compose import CONFIG_NAME, config_dir, load_launch_config, to_launch_config
from launch.config.schema import register_configs

# Set by `run_sweep` before Hydra calls `_member` (module state survives into the basic launcher's
# calls; submitit launchers pickle `_member` with the module, and the values travel in the overrides).
_COMMAND = {"name": PIPELINE, "dry_run": False}


def sweep_keys(overrides: list[str]) -> list[str]:
    """Keys whose override sweeps over several values (`a=1,2`, `range(...)`, `choice(...)`), without any
    `+`/`++`/`~` prefix."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def expand(overrides: list[str]) -> list[list[str]]:
    """Every member's plain overrides, one per given override and in the same order (the cartesian product,
    as Hydra's basic sweeper forms it)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    members: list[list[str]] = [[]]
    for o in parsed:
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        prefix = o.get_key_element()
        members = [m + [f"{prefix}={v}"] for m in members for v in values]
    return members


def validate_members(command: str, overrides: list[str]) -> int:
    """Compose and check every member before any is submitted; raises naming the first bad one."""
    from launch.submit import plan_command

    is_swept = [o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides)]
    members = expand(overrides)
    for member in members:
        swept = [m for m, sweeps in zip(member, is_swept, strict=True) if sweeps]
        try:
            cfg = load_launch_config(member)
            cfg.name = member_name(cfg.name, ",".join(sorted(swept)))  # Hydra's override_dirname sorts too
            plan_command(command, cfg)
        except Exception as exc:
            raise type(exc)(f"sweep member {' '.join(swept)}: {exc}") from None
    return len(members)


def member_name(base: str, override_dirname: str) -> str:
    """`tiny` + `pretrain.mask.num_masks=8,pretrain.mask.ratio=0.9` -> `tiny_num_masks8_ratio0.9`.

    Ordered by key without its `+`/`++`/`~` prefix, so a force-added sweep names its members the same way.
    """
    items = sorted((item.partition("=") for item in filter(None, override_dirname.split(","))), key=_bare_key)
    parts = [f"{key.split('.')[-1].split('/')[-1]}{value}" for key, _, value in items]
    return "_".join([base, *parts]) if parts else base


def _bare_key(item: tuple[str, str, str]) -> str:
    return item[0].lstrip("+~")


def _member(cfg: DictConfig) -> int:
    """One member of the sweep: its own experiment, its own command."""
    from launch.submit import run_with_config

    launch_cfg = to_launch_config(cfg)
    launch_cfg.name = member_name(launch_cfg.name, HydraConfig.get().job.override_dirname)
    result = run_with_config(_COMMAND["name"], launch_cfg, bool(_COMMAND["dry_run"]), Console())
    return result.exit_code


def run_sweep(command: str, overrides: list[str], dry_run: bool) -> int:
    """Run `command` for every member of the sweep the overrides describe."""
    register_configs()
    keys = sweep_keys(overrides)
    if not keys:
        raise ValueError("-m needs at least one swept value, e.g. pretrain.mask.ratio=0.8,0.9")
    count = validate_members(command, overrides)
    Console().print(f"sweep of {count} members over {', '.join(keys)}: every member's config is valid")
    _COMMAND.update(name=command, dry_run=dry_run)
    others = [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    hydra_overrides = [
        # The member's name comes from the swept keys only; run/sweep folders go under the experiments root.
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(others)}]",
        "hydra.sweep.dir=${root}/.sweeps/${now:%Y-%m-%d_%H-%M-%S}",
        "hydra.job.chdir=false",
        # Keep the launcher's own logging set-up: Hydra's would replace the root handlers process-wide.
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    if dry_run:  # write nothing: no .hydra folders, the sweep folder in a temporary place
        hydra_overrides += ["hydra.output_subdir=null", f"hydra.sweep.dir={tempfile.mkdtemp(prefix='extrema-sweep-')}"]
    app = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(_member)
    saved = sys.argv
    sys.argv = [f"launch {command}", "--multirun", *overrides, *hydra_overrides]
    try:
        app()
    finally:
        sys.argv = saved
    return 0
