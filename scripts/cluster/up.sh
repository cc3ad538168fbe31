#!/usr/bin/env bash
# Starts the local SLURM test cluster: munged, MariaDB, slurmdbd, slurmctld and two slurmd (node1,
# node2) on loopback, all under $CLUSTER_DIR. Starts only the daemons that are not already running,
# so running it twice is harmless; a changed slurm.conf is pushed to a running cluster with
# `scontrol reconfigure`. Returns once sinfo shows both nodes ready and sacct answers; on a failure it
# prints the failing daemon's log tail and exits non-zero.
#
# --if-possible: when the host set-up needs root and none is available, say so and exit 0 (slurm
# tests then skip). Ignored when CI=true: CI must have its cluster.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

started_at=$SECONDS

if ! "$REPO_ROOT/scripts/cluster/prepare-host.sh" --check; then
    if [[ "${1:-}" == --if-possible && "${CI:-}" != true && "$(id -u)" != 0 ]] && ! sudo -n true 2>/dev/null; then
        log "skipping the local cluster: it needs root once (packages, /etc/hosts); run 'sudo make cluster-up'"
        exit 0
    fi
    "$REPO_ROOT/scripts/cluster/prepare-host.sh"
fi

conf_changed="$("$REPO_ROOT/scripts/cluster/configure.sh")"
ME="$(id -un)"

fail() {
    local daemon="$1"
    shift
    log "$daemon failed: $*"
    show_log_tail "$daemon" 30
    exit 1
}

# Runs a daemon detached from this shell: its own session, no stdin, output to its log. Slurm's
# daemons and munged fork into the background themselves and write their own pid files.
spawn() {
    local daemon="$1"
    shift
    setsid "$@" </dev/null >>"$(log_file "$daemon")" 2>&1 || fail "$daemon" "'$*' exited with $?"
}

# Something already listens on the port: another cluster (e.g. a second checkout) or another server.
require_free_port() {
    local daemon="$1" port="$2"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "cannot start $daemon: port $port on 127.0.0.1 is taken; pick other ports with CLUSTER_PORT_BASE=<n>"
    fi
}

munge_works() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }
mysql_root() { mariadb --no-defaults -S "$MYSQL_SOCKET" -u "$ME" "$@"; }
mysql_up() { mariadb-admin --no-defaults -S "$MYSQL_SOCKET" -u "$ME" ping; }
dbd_up() { sacctmgr -n show cluster format=cluster; }
ctld_up() { scontrol ping | grep -q 'is UP'; }
sacct_answers() { sacct -n -X -S now-1hours -o JobID; }

# Every node answers and is usable (jobs may already be running on a cluster that was up).
nodes_ready() {
    local states
    states="$(sinfo -h -N -o '%N %t' | sort -u)"
    for node in "${NODE_NAMES[@]}"; do
        grep -Eq "^$node (idle|mix|alloc|comp)$" <<<"$states" || return 1
    done
}

# Check every port before starting anything, so that a clash leaves nothing half-started.
daemon_port() {
    case "$1" in
        mariadbd) echo "$MYSQL_PORT" ;;
        slurmdbd) echo "$SLURMDBD_PORT" ;;
        slurmctld) echo "$SLURMCTLD_PORT" ;;
        slurmd-*) node_port "${1#slurmd-}" ;;
    esac
}
for daemon in "${DAEMONS[@]}"; do
    port="$(daemon_port "$daemon")"
    if [[ -n "$port" ]] && ! daemon_running "$daemon"; then
        require_free_port "$daemon" "$port"
    fi
done

# --- munged: authentication between every SLURM program; our own socket and key ---
if ! daemon_running munged; then
    log "starting munged"
    spawn munged munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$(pid_file munged)" --log-file="$(log_file munged)" --seed-file="$STATE_DIR/munged.seed"
fi
wait_until 20 "munge credentials" munge_works || fail munged "munge -n | unmunge does not work"

# --- MariaDB: the accounting database, with its own datadir, socket and port on 127.0.0.1 ---
if [[ ! -d "$MYSQL_DATADIR/mysql" ]]; then
    log "initialising MariaDB in $MYSQL_DATADIR"
    mkdir -p "$MYSQL_DATADIR"
    mariadb-install-db --no-defaults --user="$ME" --datadir="$MYSQL_DATADIR" --auth-root-authentication-method=socket \
        --skip-test-db >>"$(log_file mariadbd)" 2>&1 || fail mariadbd "mariadb-install-db failed"
fi
if ! daemon_running mariadbd; then
    log "starting MariaDB on 127.0.0.1:$MYSQL_PORT"
    # mariadbd stays in the foreground; '&' puts it in the background, setsid off our session.
    mariadbd_args=(--no-defaults --datadir="$MYSQL_DATADIR" --socket="$MYSQL_SOCKET" --port="$MYSQL_PORT"
        --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$(pid_file mariadbd)"
        --log-error="$(log_file mariadbd)" --skip-log-bin --innodb-buffer-pool-size=128M
        --innodb-lock-wait-timeout=900)
    [[ "$(id -u)" == 0 ]] && mariadbd_args+=(--user=root)
    setsid mariadbd "${mariadbd_args[@]}" </dev/null >>"$(log_file mariadbd)" 2>&1 &
fi
wait_until 60 "MariaDB" mysql_up || fail mariadbd "MariaDB does not answer on $MYSQL_SOCKET"
db_password="$(cat "$DB_PASSWORD_FILE")"
mysql_root <<EOF || fail mariadbd "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_password';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# --- slurmdbd: accounting, which sacct (and so submitit) reads job states from ---
if ! daemon_running slurmdbd; then
    log "starting slurmdbd on 127.0.0.1:$SLURMDBD_PORT"
    spawn slurmdbd slurmdbd
fi
wait_until 60 "slurmdbd" dbd_up || fail slurmdbd "sacctmgr cannot reach slurmdbd"
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
    # The controller must be known to accounting before it starts, or it is not recorded.
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || fail slurmdbd "sacctmgr add cluster failed"
    sacctmgr -i add account local Cluster="$CLUSTER_NAME" Description="local test cluster" Organization=local \
        >/dev/null || fail slurmdbd "sacctmgr add account failed"
    sacctmgr -i add user "$ME" Account=local Cluster="$CLUSTER_NAME" >/dev/null ||
        fail slurmdbd "sacctmgr add user failed"
fi

# --- slurmctld: the controller ---
if ! daemon_running slurmctld; then
    log "starting slurmctld on 127.0.0.1:$SLURMCTLD_PORT"
    spawn slurmctld slurmctld -f "$SLURM_CONF_FILE"
elif [[ "$conf_changed" == changed ]]; then
    log "slurm.conf changed: scontrol reconfigure"
    scontrol reconfigure || fail slurmctld "scontrol reconfigure failed"
fi
wait_until 60 "slurmctld" ctld_up || fail slurmctld "scontrol ping does not report the controller UP"

# --- slurmd: two compute nodes on this host, told apart by -N and their ports ---
for node in "${NODE_NAMES[@]}"; do
    if ! daemon_running "slurmd-$node"; then
        log "starting slurmd $node on 127.0.0.1:$(node_port "$node")"
        spawn "slurmd-$node" slurmd -N "$node" -f "$SLURM_CONF_FILE"
    fi
done

# A node that was killed last time comes back DOWN or DRAINED; put it back in service.
if ! wait_until 30 "nodes to register" nodes_ready; then
    for node in "${NODE_NAMES[@]}"; do
        scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
    done
fi
if ! wait_until 60 "nodes node1 and node2 to be ready" nodes_ready; then
    sinfo -N >&2 || true
    show_log_tail slurmd-node1 15
    show_log_tail slurmd-node2 15
    fail slurmctld "nodes did not become idle"
fi
wait_until 30 "sacct" sacct_answers || fail slurmdbd "sacct does not answer"

log "cluster '$CLUSTER_NAME' is up ($((SECONDS - started_at))s); use it with: export SLURM_CONF=$SLURM_CONF_FILE"
