"""Rules for every value a user types that ends up in a batch script or an sbatch option.

A batch script is a shell script whose `#SBATCH` lines sbatch reads as options: a newline in a value
starts a new shell line or a new `#SBATCH` line, and a space in a one-token value puts a second option
on its line. So each such value is checked when the command is typed, and refused with the field, the
value and the rule; only `cluster.setup` is the user's own shell. `cluster.sbatch_extra` may add
options, but none that the launcher sets itself, in any spelling sbatch accepts: the long name, its
short form, a unique-prefix abbreviation of it, or its `no-` negation.
"""

from __future__ import annotations

import re

# Long options the launcher sets (or that would change what it sets), with their short forms.
MANAGED_OPTIONS = {
    "job-name": "J",
    "nodes": "N",
    "ntasks": "n",
    "ntasks-per-node": None,
    "cpus-per-task": "c",
    "gpus": "G",
    "gpus-per-node": None,
    "time": "t",
    "signal": None,
    "requeue": None,
    "open-mode": None,
    "output": "o",
    "error": "e",
    "dependency": "d",
    "kill-on-invalid-dep": None,
    "chdir": "D",
    "partition": "p",
    "account": "A",
    "qos": "q",
    "constraint": "C",
    "mem": None,
    "array": "a",
    "wckey": None,
}
# sbatch options that a managed name starts with, or that look like a negation, but are options of their own
# (getopt takes an exact long name over an abbreviation).
_OWN_OPTIONS = frozenset({"no-kill", "nodefile", "nodelist", "mem-per-cpu", "mem-per-gpu", "time-min"})
_OPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_no_control(field: str, value: str) -> None:
    """No newline, carriage return or NUL: each would end the script line the value is written on."""
    for char, name in (("\n", "a newline"), ("\r", "a carriage return"), ("\0", "a NUL byte")):
        if char in value:
            raise ValueError(
                f"{field}={value!r} contains {name}: it would start a new line of the batch script. "
                "Use one line; put your own shell lines in cluster.setup"
            )


def check_one_token(field: str, value: str) -> None:
    """A value that sbatch reads as one option value: no control characters and no whitespace."""
    check_no_control(field, value)
    if not value or re.search(r"\s", value):
        raise ValueError(f"{field}={value!r} must be one word without spaces (sbatch reads it as one option value)")


def check_path_component(field: str, value: str) -> None:
    """A name that becomes one folder and part of the job name: one word, no `/`, not `.` or `..`."""
    check_one_token(field, value)
    if "/" in value or value in (".", ".."):
        raise ValueError(f"{field}={value!r} must be a single folder name (no '/', not '.' or '..')")


def check_sbatch_extra(extra: dict[str, str]) -> None:
    """`cluster.sbatch_extra`: option names of sbatch's shape, none of them managed, values on one line."""
    for raw_key, value in extra.items():
        key = str(raw_key).lstrip("-")
        field = f"cluster.sbatch_extra.{raw_key}"
        if not _OPTION_NAME.fullmatch(key):
            raise ValueError(f"{field}: {raw_key!r} is not an sbatch option name (letters, digits and '-')")
        managed = _managed_spelling(key)
        if managed:
            raise ValueError(
                f"{field}: {raw_key!r} would set --{managed}, which the launcher manages; "
                f"use the cluster.* setting for it instead of cluster.sbatch_extra"
            )
        check_no_control(field, str(value))


def check_env(env: dict[str, str]) -> None:
    """`cluster.env`: shell variable names, and values on one line (they are quoted for the shell)."""
    for key, value in env.items():
        if not _ENV_NAME.fullmatch(str(key)):
            raise ValueError(f"cluster.env: {key!r} is not a shell variable name (letters, digits, '_')")
        check_no_control(f"cluster.env.{key}", str(value))


def _managed_spelling(key: str) -> str | None:
    """The managed option that `key` would set as sbatch reads it, or None."""
    if key in _OWN_OPTIONS:
        return None
    name = key.removeprefix("no-") if key.startswith("no-") else key
    for option, short in MANAGED_OPTIONS.items():
        if name == option or (len(key) == 1 and key == short):
            return option
    if len(name) > 1 or key == name:  # an abbreviation: sbatch accepts any unique prefix of a long name
        for option in MANAGED_OPTIONS:
            if option.startswith(name) and name not in _OWN_OPTIONS:
                return option
    return None
