# Shared settings of the local test cluster; sourced by up.sh, down.sh, status.sh and configure.sh.
#
# Everything the cluster writes (configs, keys, databases, logs, pid files, sockets) lives under one
# folder, $CLUSTER_DIR (default: .cluster/ at the repository root), so that removing it removes the
# cluster. Ports sit on loopback; CLUSTER_PORT_BASE moves them all, e.g. for a second checkout.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_DIR="${CLUSTER_DIR:-$REPO_ROOT/.cluster}"
CLUSTER_NAME="${CLUSTER_NAME:-extrema}"
SETTINGS_FILE="$CLUSTER_DIR/etc/settings.env"
# A cluster keeps the ports it was first set up with, unless CLUSTER_PORT_BASE is given again.
if [[ -z "${CLUSTER_PORT_BASE:-}" && -f "$SETTINGS_FILE" ]]; then
    # shellcheck source=/dev/null
    source "$SETTINGS_FILE"
fi
CLUSTER_PORT_BASE="${CLUSTER_PORT_BASE:-17000}"
# Seconds a preempted low-priority job keeps running after SIGTERM before it is killed and requeued.
CLUSTER_GRACE_TIME="${CLUSTER_GRACE_TIME:-10}"
# 1: on preemption send the job's own --signal (submitit's USR2) instead of SIGTERM.
PREEMPT_USER_SIGNAL="${PREEMPT_USER_SIGNAL:-0}"

ETC_DIR="$CLUSTER_DIR/etc"
RUN_DIR="$CLUSTER_DIR/run"
LOG_DIR="$CLUSTER_DIR/log"
STATE_DIR="$CLUSTER_DIR/state"

SLURM_CONF_FILE="$ETC_DIR/slurm.conf"
SLURMDBD_CONF_FILE="$ETC_DIR/slurmdbd.conf"
MUNGE_KEY="$ETC_DIR/munge.key"
MUNGE_SOCKET="$RUN_DIR/munge.sock"
MYSQL_SOCKET="$RUN_DIR/mysqld.sock"
MYSQL_DATADIR="$STATE_DIR/mysql"
DB_PASSWORD_FILE="$ETC_DIR/db.password"

SLURMCTLD_PORT=$((CLUSTER_PORT_BASE + 0))
SLURMDBD_PORT=$((CLUSTER_PORT_BASE + 1))
MYSQL_PORT=$((CLUSTER_PORT_BASE + 2))
NODE_NAMES=(node1 node2)
# node1 -> BASE+11, node2 -> BASE+12
node_port() { echo $((CLUSTER_PORT_BASE + 10 + ${1#node})); }

# Daemons in start order; cluster-down stops them in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-node1 slurmd-node2)

export SLURM_CONF="$SLURM_CONF_FILE"
# The daemons live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

pid_file() { echo "$RUN_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

# The program a daemon runs as (slurmd-node1 -> slurmd).
daemon_exe() {
    case "$1" in
        slurmd-*) echo slurmd ;;
        *) echo "$1" ;;
    esac
}

# Prints the pid of a running daemon started by us, or nothing. The program name in the process's
# command line must match, so a stale pid file whose pid now belongs to another process is ignored.
daemon_pid() {
    local name="$1" file pid exe
    file="$(pid_file "$name")"
    [[ -s "$file" ]] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 0
    exe="$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1)"
    if [[ "${exe##*/}" == "$(daemon_exe "$name")" ]]; then
        echo "$pid"
    fi
}

daemon_running() { [[ -n "$(daemon_pid "$1")" ]]; }

# True while the process exists and is not a zombie (an exited daemon waiting to be reaped by init).
process_alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]]
}

# Last lines of a daemon's log, for error messages.
show_log_tail() {
    local file
    file="$(log_file "$1")"
    if [[ -s "$file" ]]; then
        printf '[cluster] ---- last lines of %s ----\n' "$file" >&2
        tail -n "${2:-25}" "$file" >&2
        printf '[cluster] ----\n' >&2
    else
        log "no log at $file"
    fi
}

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_until() {
    local seconds="$1" what="$2" deadline
    shift 2
    deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}
