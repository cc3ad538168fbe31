#!/usr/bin/env bash
# Stops the local SLURM test cluster: cancels its jobs, then stops the daemons that up.sh started,
# newest first, by the pids in their pid files (never by name, so other SLURM or MariaDB servers on
# the machine are left alone). Configs and state stay in $CLUSTER_DIR for the next cluster-up.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Jobs are cancelled first: their slurmstepd processes are not ours to kill, and they end with them.
if daemon_running slurmctld && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        wait_until 30 "jobs to end" bash -c '[[ -z "$(squeue -h -t running,completing -o %A)" ]]' || true
    fi
fi

not() { ! "$@"; }

stop_daemon() {
    local name="$1" pid
    pid="$(daemon_pid "$name")"
    if [[ -z "$pid" ]]; then
        rm -f "$(pid_file "$name")"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 20 "$name to exit" not process_alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 5 "$name to die" not process_alive "$pid" || log "WARNING: $name (pid $pid) is still running"
    fi
    rm -f "$(pid_file "$name")"
}

for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[i]}"
done
log "cluster stopped"
