#!/usr/bin/env bash
# Run a kdhpc recipe on a SLURM cluster: one DeepSpeed rank per task (= per GPU), resumable.
#
#   sbatch slurm/distill.sh CONFIG [key=value ...]
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --partition=gpu \
#          slurm/distill.sh configs/recon_default.yaml loss.alpha=0.5 run_dir=runs/recon_a05
#   sbatch --nodes=2 --ntasks-per-node=8 --cpus-per-task=2 --partition=cpu slurm/distill.sh CONFIG
#
# Submit from the kdhpc checkout (or export KDHPC_ROOT=/path/to/kdhpc); CONFIG and relative
# run_dirs are read from the submit directory. Every #SBATCH default below is overridden by the
# same sbatch flag on the command line. --ntasks-per-node is the number of ranks per node: on a
# GPU partition set it to the GPUs per node (one task per GPU); on a CPU-only partition the
# ranks train on CPU (DeepSpeed's cpu accelerator, gloo), each with --cpus-per-task threads.
#
# Preemption and time limits: SLURM sends SIGUSR1 120 s before the end (--signal) and SIGTERM on
# preemption; every rank checkpoints and exits 75, rank 0 requeues the job (--requeue), and the
# next start resumes from the checkpoint (finished stages are skipped). Any other failing rank
# kills the others (srun --kill-on-bad-exit) and the job fails. See slurm/launch.sh.
#
#SBATCH --job-name=kdhpc-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
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
exec bash "$root/slurm/launch.sh" job kdhpc.distill "$@"
