#!/usr/bin/env bash
# Host set-up the local cluster needs and that only root can do: the Debian packages (slurm-wlm,
# munge, slurmdbd, mariadb-server) when a program is missing, and "127.0.0.1 node1 node2" in
# /etc/hosts (submitit and torch.distributed use the first node's name as the rendezvous address).
# Does nothing when both are already in place. Uses sudo when not run as root.
# --check: change nothing; exit 0 when the host is ready, 1 when this script would have work to do.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
PROGRAMS=(munged munge unmunge mariadbd mariadb mariadb-install-db slurmdbd slurmctld slurmd sbatch srun sacct sacctmgr)

resolves_to_loopback() {
    getent hosts "$1" | awk '{print $1}' | grep -qx '127\.0\.0\.1'
}

missing=()
for prog in "${PROGRAMS[@]}"; do
    command -v "$prog" >/dev/null || missing+=("$prog")
done
needs_hosts=()
for node in "${NODE_NAMES[@]}"; do
    resolves_to_loopback "$node" || needs_hosts+=("$node")
done

if [[ "${1:-}" == --check ]]; then
    ((${#missing[@]} == 0 && ${#needs_hosts[@]} == 0))
    exit
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo: run 'sudo make cluster-up' or install ${PACKAGES[*]} yourself"
    SUDO="sudo"
fi

if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]} (or your system's equivalents)"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # The packages would start their own system services; a policy-rc.d that says "no" keeps them
    # from doing so, because this cluster runs its own daemons on its own ports and folders.
    added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    status=0
    {
        $SUDO apt-get update -qq &&
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"${TMPDIR:-/tmp}/extrema-cluster-apt.log" 2>&1 || status=$?
    if ((added_policy)); then
        $SUDO rm -f /usr/sbin/policy-rc.d
    fi
    if ((status)); then
        tail -n 30 "${TMPDIR:-/tmp}/extrema-cluster-apt.log" >&2
        die "apt-get install ${PACKAGES[*]} failed (exit $status); full log: ${TMPDIR:-/tmp}/extrema-cluster-apt.log"
    fi
    for prog in "${PROGRAMS[@]}"; do
        command -v "$prog" >/dev/null || die "$prog still missing after installing ${PACKAGES[*]}"
    done
fi

if ((${#needs_hosts[@]})); then
    log "adding '127.0.0.1 ${needs_hosts[*]}' to /etc/hosts"
    # Append only: /etc/hosts is often a bind mount, which an in-place rewrite (sed -i) would break.
    printf '127.0.0.1 %s\n' "${needs_hosts[*]}" | $SUDO tee -a /etc/hosts >/dev/null
    for node in "${needs_hosts[@]}"; do
        resolves_to_loopback "$node" || die "$node does not resolve to 127.0.0.1 even after editing /etc/hosts"
    done
fi
