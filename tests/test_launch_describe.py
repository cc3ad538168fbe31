"""`launch config --describe PREFIX` prints each key's value, type and docstring; Hydra's `--cfg job` is an alias."""

from __future__ import annotations

import dataclasses

from launch.cli import main
from launch.config.schema import ClusterConfig
from launch.reporting.describe import describe, field_docs


def test_describe_prints_the_value_type_and_docstring_of_each_key_under_the_prefix(capsys) -> None:
    assert (
        main(["config", "--describe", "pretrain.run.stall", "experiment=tiny", "pretrain.run.stall_timeout_s=5"]) == 0
    )
    out = capsys.readouterr().out
    assert "pretrain.run.stall_timeout_s (float | None) = 5.0\n    A rank on which no step completes" in out
    assert "pretrain.run.stall_first_step_s (float) = 1800.0\n    The allowance of the first step" in out
    assert "pretrain.run.seed" not in out


def test_every_cluster_field_has_a_docstring_and_an_unknown_prefix_is_an_error(capsys) -> None:
    docs = field_docs(ClusterConfig)
    assert [f.name for f in dataclasses.fields(ClusterConfig) if not docs.get(f.name)] == []
    assert main(["config", "--describe", "clusterr."]) == 2
    assert "no config key starts with 'clusterr.'" in capsys.readouterr().out


def test_hydras_cfg_job_prints_the_composed_config(capsys) -> None:
    assert main(["pipeline", "experiment=tiny", "cluster.nodes=3", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "the composed config" in out and "name: tiny" in out and "nodes: 3" in out


def test_describe_walks_nested_configs() -> None:
    from launch.config.compose import load_launch_config

    rows = describe(load_launch_config(["experiment=tiny"]), "pretrain.mask.")
    assert [r[0] for r in rows][:2] == ["pretrain.mask.ratio", "pretrain.mask.num_masks"]
    assert all(r[3] for r in rows)
