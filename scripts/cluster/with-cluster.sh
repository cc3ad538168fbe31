#!/usr/bin/env bash
# Runs a command with the local SLURM test cluster up and SLURM_CONF pointing at it:
#   scripts/cluster/with-cluster.sh python -m pytest
# Starts the cluster when it is not running (where root is available, see up.sh --if-possible) and
# stops it again afterwards if this script started it, unless KEEP_CLUSTER=1. Exits with the
# command's status.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"

started=0
if ! "$here/status.sh" --quiet; then
    "$here/up.sh" --if-possible
    if "$here/status.sh" --quiet; then
        started=1
    fi
fi

stop_if_started() {
    if ((started)) && [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
        "$here/down.sh"
    fi
}
trap stop_if_started EXIT

# shellcheck source=env.sh
source "$here/env.sh"
status=0
"$@" || status=$?
exit "$status"
