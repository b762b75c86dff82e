#!/usr/bin/env bash
# Submit rsdino pretraining to Slurm: turns a few common options into sbatch flags and passes the
# training arguments, unchanged, to train.sbatch next to this file.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/slurm/submit.sh [options] -- [rsdino train arguments...]

Submit train.sbatch with sbatch. Everything after -- goes to `rsdino train` on every rank.

options:
  --nodes N          number of nodes (default in train.sbatch: 1)
  --gpus-per-node G  GPUs, hence ranks, per node (default in train.sbatch: 8)
  --time T           time limit, e.g. 2-00:00:00; the job requeues itself 5 minutes before it
  --partition P      Slurm partition
  --account A        account to charge
  --dry-run          print the sbatch command instead of running it
  -h, --help         show this help

Set RSDINO_LAUNCHER=torchrun to start one torchrun per node instead of one srun task per GPU.

example:
  scripts/slurm/submit.sh --nodes 2 --time 1-00:00:00 -- \
      --config vitl16_short_s2 --output-dir runs/s2 optim.epochs=50
EOF
}

fail() {
  echo "submit.sh: $1 (see --help)" >&2
  exit 2
}

sbatch_args=()
dry_run=0
while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    --nodes | --gpus-per-node | --time | --partition | --account)
      (($# >= 2)) || fail "$1 needs a value"
      case "$1" in
        # One rank per GPU: train.sbatch gives each task one GPU.
        --gpus-per-node) sbatch_args+=("--ntasks-per-node=$2") ;;
        *) sbatch_args+=("$1=$2") ;;
      esac
      shift 2
      ;;
    --)
      shift
      break
      ;;
    *)
      fail "unknown option '$1'; put rsdino train arguments after --"
      ;;
  esac
done

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command=(sbatch "${sbatch_args[@]}" "$script_dir/train.sbatch" "$@")
if ((dry_run)); then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  "${command[@]}"
fi
