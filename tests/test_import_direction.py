"""Imports go one way: launch -> jobs -> extrema. The core knows nothing of SLURM, submitit or Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_the_cli_parses_a_command_without_loading_torch() -> None:
    # The command names come from extrema.tasks; reading them must not pull the training stack in
    # (extrema's public API is imported on first use).
    code = (
        "import sys, launch.cli\n"
        "args = launch.cli._parser().parse_args(['linprobe', '--dry-run', 'experiment=tiny'])\n"
        "assert args.command == 'linprobe', args\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from extrema import load_model\n"
        "assert load_model.__module__ == 'extrema.api' and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
