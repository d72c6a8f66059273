#!/usr/bin/env bash
# .ci/slurm.sh -- the SLURM cluster that tests/test_slurm.py and tests/test_sweep.py run on in CI:
# Debian's slurm + munge packages (and MariaDB + slurmdbd, so that sacct and submitit see jobs
# that die), two emulated nodes on this host, fake GPUs on a "gpu" partition. The daemons are
# started and stopped by PID through tests/slurm/slurm-local.sh; nothing else on the host changes
# except one /etc/hosts line (node1 node2 -> 127.0.0.1) that `stop` removes again.
#
# In .ci/run (as root), around the tests:
#
#   slurm_env=$(bash .ci/slurm.sh start)   # install if missing, start; prints export lines
#   eval "$slurm_env"                      # SLURM_LOCAL_DIR, SLURM_CONF, KDHPC_REQUIRE_SLURM=1
#   trap 'bash .ci/slurm.sh stop' EXIT     # even when the tests fail
#
#   bash .ci/slurm.sh logs                 # daemon logs, for a failing run
#
# A developer does the same by hand (`eval "$(bash .ci/slurm.sh start)"`). KDHPC_REQUIRE_SLURM=1
# turns the SLURM tests' "no cluster here" skip into a failure, so CI cannot pass without them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fixture="$here/../tests/slurm/slurm-local.sh"

export SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/kdhpc-slurm}
export SLURM_LOCAL_NODES=${SLURM_LOCAL_NODES:-2}
export SLURM_LOCAL_ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
# Advertise more CPUs than the 2 real cores so that the #SBATCH defaults (4 CPUs per task) and a
# few concurrent sweep trials fit; the tests themselves ask for 1 CPU per rank.
export SLURM_LOCAL_CPUS=${SLURM_LOCAL_CPUS:-8}
export SLURM_LOCAL_GPUS=${SLURM_LOCAL_GPUS:-2}
export SLURM_LOCAL_PARTITIONS=${SLURM_LOCAL_PARTITIONS:-"debug gpu"}

elapsed() { echo "slurm.sh: $1 in $((SECONDS - $2)) s" >&2; }

case "${1:-}" in
  start)
    t=$SECONDS
    bash "$fixture" install >&2
    elapsed "packages ready" "$t"
    t=$SECONDS
    mkdir -p "$SLURM_LOCAL_DIR"
    bash "$fixture" start >/dev/null
    elapsed "cluster up" "$t"
    printf 'export %s=%q\n' SLURM_LOCAL_DIR "$SLURM_LOCAL_DIR" \
      SLURM_CONF "$SLURM_LOCAL_DIR/slurm.conf" KDHPC_REQUIRE_SLURM 1
    ;;
  stop)
    t=$SECONDS
    bash "$fixture" stop
    elapsed "cluster stopped" "$t"
    ;;
  logs) bash "$fixture" logs ;;
  *) echo "usage: bash .ci/slurm.sh start|stop|logs" >&2; exit 2 ;;
esac
