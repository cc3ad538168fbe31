"""Imports go one way: launch -> jobs -> extrema. The core knows nothing of SLURM, submitit or Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "extrema": {"jobs", "launch", "submitit", "hydra", "hydra_plugins", "omegaconf"},
    "jobs": {"launch", "hydra", "hydra_plugins"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_top_levels(f) & FORBIDDEN[package])
        for f in files
        if imported_top_levels(f) & FORBIDDEN[package]
    }
    assert not offenders, f"imports against launch -> jobs -> extrema: {offenders}"


def test_the_scanner_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import submitit\nfrom launch.cli import main\nfrom . import x\n")
    assert imported_top_levels(sample) == {"submitit", "launch"}
