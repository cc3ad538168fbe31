#!/usr/bin/env bash
# Shows the local SLURM test cluster: which of its daemons run, sinfo, and whether sacct answers.
# Exits 0 only when every daemon runs and both the controller and accounting answer.
# --quiet: print nothing, only the exit status.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

quiet=0
[[ "${1:-}" == --quiet ]] && quiet=1
say() { ((quiet)) || printf '%s\n' "$*"; }

healthy=1
if [[ ! -f "$SLURM_CONF_FILE" ]]; then
    say "no local cluster configured in $CLUSTER_DIR (run 'make cluster-up')"
    exit 1
fi

say "SLURM_CONF=$SLURM_CONF_FILE"
for daemon in "${DAEMONS[@]}"; do
    pid="$(daemon_pid "$daemon")"
    if [[ -n "$pid" ]]; then
        say "$(printf '  %-14s running (pid %s)' "$daemon" "$pid")"
    else
        say "$(printf '  %-14s stopped' "$daemon")"
        healthy=0
    fi
done
if ((!healthy)); then
    say "cluster is not (fully) running; start it with 'make cluster-up'"
    exit 1
fi

if ((quiet)); then
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' && timeout 10 sacct -n -X -S now-1hours >/dev/null 2>&1
    exit
fi

echo
echo "\$ sinfo"
timeout 10 sinfo || healthy=0
echo
echo "\$ sinfo -N -l"
timeout 10 sinfo -N -l || healthy=0
echo
echo "\$ sacct -X -S now-1hours -o JobID,JobName,Partition,State,Elapsed,ExitCode"
if timeout 10 sacct -X -S now-1hours -o JobID,JobName%20,Partition,State,Elapsed,ExitCode; then
    echo "sacct answers (accounting through slurmdbd works)"
else
    echo "sacct does NOT answer: see $(log_file slurmdbd)"
    healthy=0
fi
((healthy))
