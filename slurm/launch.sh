#!/usr/bin/env bash
# launch.sh -- the body shared by kdhpc's sbatch entry points (slurm/distill.sh,
# slurm/teacher_cache.sh); not submitted by itself.
#
#   bash slurm/launch.sh job  MODULE CONFIG [key=value ...]   # in the batch script: one srun step
#   bash slurm/launch.sh task MODULE CONFIG [key=value ...]   # what srun runs on every task
#
# job: exports MASTER_ADDR (first host of `scontrol show hostnames $SLURM_JOB_NODELIST`) and
# MASTER_PORT (15000 + job id mod 15000, the same formula as kdhpc.train.slurm_master_port, so
# that jobs sharing a node do not collide), then runs `python -m MODULE CONFIG ...` once per task
# with `srun --kill-on-bad-exit=1`; each rank reads its rank from SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID (kdhpc.train.discover_ranks). Every argument travels as its own argv element
# ("$@"), never through a `bash -c` string, so no value is ever parsed by a shell.
#
# task: runs the module and translates its exit status for srun. Exit code 75 (EX_TEMPFAIL,
# kdhpc.train.EXIT_REQUEUE) means "preempted: every rank checkpointed, requeue me". srun's
# --kill-on-bad-exit would kill the other ranks as soon as the first one exits non-zero, and
# srun then reports the killed ranks' status instead of 75, so a rank that exits 75 reports 0
# to srun and rank 0 requeues the job itself (`scontrol requeue $SLURM_JOB_ID`). Rank 0 exits
# only after the checkpoint is marked complete on every rank, so the requeue cannot cut a save
# short. The requeued job starts the same command again, and kdhpc resumes from the checkpoint.
# Any other non-zero exit is a failure: srun kills the remaining ranks and the job fails.
set -uo pipefail

EXIT_REQUEUE=75

say() { echo "kdhpc: $*" >&2; }

python_bin() {
  if [ -n "${KDHPC_PYTHON:-}" ]; then echo "$KDHPC_PYTHON"
  elif command -v python >/dev/null 2>&1; then echo python
  else echo python3; fi
}

run_job() {
  local module=$1; shift
  local entry=${module##*.}
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    say "not inside a SLURM job: submit with 'sbatch slurm/${entry}.sh CONFIG [key=value ...]'" \
        "(or run 'python -m $module CONFIG' directly)"
    return 2
  fi
  if [ $# -lt 1 ] || [ "${1:0:1}" = - ]; then
    say "usage: sbatch [sbatch options] slurm/${entry}.sh CONFIG [key=value ...]; found: ${*:-no CONFIG}"
    return 2
  fi
  if [ ! -f "$1" ]; then
    say "CONFIG: file not found: '$1' (relative paths are read from the submit directory $PWD)"
    return 2
  fi
  local root; root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  if [ -z "$MASTER_ADDR" ]; then
    say "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
    return 1
  fi
  export MASTER_ADDR
  export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
  # A launcher's variables left in the submitting shell would take precedence over SLURM's.
  unset RANK WORLD_SIZE LOCAL_RANK
  export OMP_NUM_THREADS=${OMP_NUM_THREADS_PER_RANK:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  local srun_args=(--kill-on-bad-exit=1)
  # Slurm 22.05+ no longer passes the job's --cpus-per-task on to srun by itself.
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
  say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $module on ${SLURM_NTASKS:-1} ranks," \
      "nodes $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
  # SIGTERM/USR1 reach the ranks directly (and through srun); the batch shell must outlive
  # them so that it reports their real exit status.
  trap 'say "batch shell got a signal; waiting for the ranks to checkpoint"' TERM USR1
  srun "${srun_args[@]}" bash "$root/slurm/launch.sh" task "$module" "$@" &
  local pid=$! rc
  wait "$pid"; rc=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done  # a trapped signal ends wait early
  if [ "$rc" = 0 ]; then
    say "job $SLURM_JOB_ID: $module finished"
  else
    say "job $SLURM_JOB_ID: srun exit status $rc: a rank failed (see its error above), or the job was cancelled or requeued"
  fi
  return "$rc"
}

run_task() {
  local module=$1; shift
  local rc
  say "rank ${SLURM_PROCID:-0} of ${SLURM_NTASKS:-1} on ${SLURMD_NODENAME:-$(hostname -s)}" \
      "(local rank ${SLURM_LOCALID:-0})"
  # SLURM signals every process of the step, this shell too: it must outlive the rank to
  # report its exit status. SIGUSR1 is only a warning, so it is ignored here and (inherited)
  # in the rank outside training, where it would otherwise kill the process; the engine
  # installs its own handler while it trains. SIGTERM keeps its default in the rank.
  trap '' USR1
  trap 'say "rank ${SLURM_PROCID:-0}: SIGTERM, waiting for the rank to stop"' TERM
  "$(python_bin)" -m "$module" "$@"
  rc=$?
  [ "$rc" = "$EXIT_REQUEUE" ] || return "$rc"
  if [ "${SLURM_PROCID:-0}" != 0 ]; then
    return 0  # checkpointed; rank 0 requeues the job
  fi
  say "rank 0: checkpointed after a preemption signal; requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    # The requeue terminates this job within seconds (SIGTERM, now fatal here); returning now
    # would let srun and the batch script report a finished run first.
    trap - TERM
    sleep "${KDHPC_REQUEUE_WAIT:-300}" & wait $!
    say "job $SLURM_JOB_ID was not stopped after its requeue"
    return "$EXIT_REQUEUE"
  fi
  say "scontrol requeue $SLURM_JOB_ID failed; the run is checkpointed: submit the same" \
      "command again to resume it"
  return "$EXIT_REQUEUE"
}

case "${1:-}" in
  job) shift; run_job "$@" ;;
  task) shift; run_task "$@" ;;
  *) say "usage: launch.sh job|task MODULE CONFIG [key=value ...]"; exit 2 ;;
esac
