#!/usr/bin/env bash
# Writes the local cluster's munge key, database password, slurm.conf and slurmdbd.conf under
# $CLUSTER_DIR/etc. Keys and passwords are made once; the two .conf files are rewritten from the
# current settings, and the script prints "changed" when slurm.conf differs from what was there, so
# that a running cluster can be told to reread it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mkdir -p "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR" "$STATE_DIR/slurmctld"
for node in "${NODE_NAMES[@]}"; do
    mkdir -p "$STATE_DIR/spool-$node"
done
chmod 755 "$CLUSTER_DIR" "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR"

echo "CLUSTER_PORT_BASE=$CLUSTER_PORT_BASE" >"$SETTINGS_FILE"

if [[ ! -s "$MUNGE_KEY" ]]; then
    # munged wants a private key of at least 32 bytes, owned by the user it runs as.
    (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY")
fi
chmod 600 "$MUNGE_KEY"

if [[ ! -s "$DB_PASSWORD_FILE" ]]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '+/=\n' >"$DB_PASSWORD_FILE")
fi

# Unix sockets are limited to 108 bytes; a deep checkout would otherwise fail with an obscure error.
for sock in "$MUNGE_SOCKET" "$MYSQL_SOCKET"; do
    ((${#sock} < 100)) || die "socket path too long (${#sock} bytes): $sock; set CLUSTER_DIR to a shorter folder"
done

SLURM_USER="$(id -un)"
CPUS_PER_NODE="${CLUSTER_CPUS_PER_NODE:-2}"

ctld_params=""
if [[ "$PREEMPT_USER_SIGNAL" == 1 ]]; then
    ctld_params="SlurmctldParameters=preempt_send_user_signal"
fi

new_conf="$(mktemp "$ETC_DIR/slurm.conf.XXXXXX")"
cat >"$new_conf" <<EOF
# Local test cluster written by scripts/cluster/configure.sh; edits are overwritten.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmUser=$SLURM_USER
SlurmdUser=$SLURM_USER
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET

StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/spool-%n
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$(log_file slurmctld)
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups inside containers and sandboxes: track job processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node sizes below rather than the host's hardware, so a laptop of any size can run it.
SlurmdParameters=config_overrides
ReturnToService=2

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURMDBD_PORT
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none

# Short timers so that tests see state changes quickly; requeue must work for preemption tests.
JobRequeue=1
KillWait=5
MinJobAge=120
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=60
SlurmctldTimeout=60
SchedulerParameters=sched_interval=2,bf_interval=2
$ctld_params

# A job in 'high' preempts jobs in 'low': they get SIGTERM (or their --signal with
# preempt_send_user_signal), GraceTime seconds to finish, then are killed and requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE

NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(node_port node1) CPUs=$CPUS_PER_NODE RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(node_port node2) CPUs=$CPUS_PER_NODE RealMemory=4000 State=UNKNOWN
PartitionName=low Nodes=node1,node2 Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$CLUSTER_GRACE_TIME MaxTime=INFINITE State=UP
PartitionName=high Nodes=node1,node2 PriorityTier=2 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF

if [[ -f "$SLURM_CONF_FILE" ]] && cmp -s "$new_conf" "$SLURM_CONF_FILE"; then
    rm -f "$new_conf"
else
    chmod 644 "$new_conf"
    mv -f "$new_conf" "$SLURM_CONF_FILE"
    echo changed
fi

# slurmdbd finds its config beside $SLURM_CONF and refuses one that others can read.
(
    umask 077
    cat >"$SLURMDBD_CONF_FILE" <<EOF
# Accounting daemon of the local test cluster, written by scripts/cluster/configure.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=$SLURM_USER
PidFile=$(pid_file slurmdbd)
LogFile=$(log_file slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(cat "$DB_PASSWORD_FILE")
StorageLoc=slurm_acct_db
EOF
)
chmod 600 "$SLURMDBD_CONF_FILE"
