# Source this file to point SLURM's commands (sbatch, squeue, sacct, submitit) at the local test
# cluster: `source scripts/cluster/env.sh`. It exports SLURM_CONF only when that cluster has been
# configured and SLURM_CONF is not already set, so on a real cluster it changes nothing.
_extrema_cluster_conf="${CLUSTER_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.cluster}/etc/slurm.conf"
if [[ -z "${SLURM_CONF:-}" && -f "$_extrema_cluster_conf" ]]; then
    export SLURM_CONF="$_extrema_cluster_conf"
fi
unset _extrema_cluster_conf
