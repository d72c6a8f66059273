#!/usr/bin/env bash
# Precompute a recipe's teacher outputs into its HDF5 cache on a SLURM cluster, one shard per
# task (python -m kdhpc.teacher.cache, distributed over the ranks), before training students.
#
#   sbatch slurm/teacher_cache.sh CONFIG [key=value ...] [--force] [--verify]
#   sbatch --nodes=1 --ntasks-per-node=4 --gpus-per-node=4 --partition=gpu \
#          slurm/teacher_cache.sh configs/recon_default.yaml teacher.cache_dir=/scratch/recon_cache
#
# Same shape as slurm/distill.sh (submit from the kdhpc checkout or export KDHPC_ROOT; #SBATCH
# defaults overridden by sbatch flags; srun --kill-on-bad-exit; see slurm/launch.sh). A killed
# fill is resumable: the next run keeps every finished record, so the job requeues itself when
# SLURM preempts it, and a resubmission continues where it stopped.
#
#SBATCH --job-name=kdhpc-teacher-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from the node's spool directory: find the checkout the
# original was submitted from (its path heads `scontrol show job`'s Command=, before the args).
root=${KDHPC_ROOT:-}
if [ -z "$root" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)
  [ $# -gt 0 ] && command=${command%" $*"}
  root=$(dirname "$(dirname "$command")")
fi
[ -f "$root/slurm/launch.sh" ] || root=${SLURM_SUBMIT_DIR:-$PWD}
[ -f "$root/slurm/launch.sh" ] || { echo "kdhpc: cannot find the kdhpc checkout (slurm/launch.sh); export KDHPC_ROOT" >&2; exit 2; }
exec bash "$root/slurm/launch.sh" job kdhpc.teacher.cache "$@"
