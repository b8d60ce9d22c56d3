#!/usr/bin/env bash
# Runs mcd_jax on a SLURM GPU cluster: submits itself with sbatch when started
# outside an allocation, and starts one process per GPU with srun inside one.
# Run ./launch/slurm_gpu.sh --help for the options.
set -euo pipefail

# sbatch runs a copy of this script from its spool folder, so the submission
# passes the repository root on in MCD_REPO_ROOT.
REPO_ROOT="${MCD_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
SCRIPT="${REPO_ROOT}/launch/slurm_gpu.sh"
ORIGINAL_ARGS=("$@")

usage() {
  cat <<'EOF'
Usage: launch/slurm_gpu.sh [options] [-- extra mcd_jax.main flags]

Outside an allocation (no SLURM_JOB_ID) the script submits itself with sbatch.
Inside one (the submitted job, or salloc) it runs, from the repository root,

  srun --ntasks-per-node=G python3 -m mcd_jax.main --config=CONFIG
      --workdir=WORKDIR --platform=gpu --min_devices=NODES*G [extra flags]

that is, one process per GPU. jax.distributed starts from the SLURM variables
(mcd_jax.main --distributed auto does so when SLURM_NTASKS > 1), and JAX gives
process SLURM_LOCALID the GPU of that index on its node.

Options (environment variable in brackets):
  --nodes N               nodes (NODES, default: SLURM_JOB_NUM_NODES or 1).
  --gpus_per_node G       GPUs per node, one process each (GPUS_PER_NODE, default 8).
  --time T                sbatch time limit, e.g. 24:00:00 (TIME, default 24:00:00).
  --partition P           sbatch partition (PARTITION, default: the cluster's).
  --account A             sbatch account (ACCOUNT).
  --job_name NAME         sbatch job name (JOB_NAME, default mcd_jax).
  --sbatch_arg ARG        extra sbatch option, e.g. --sbatch_arg=--qos=high (repeatable).
  --config FILE           config file relative to the repository, optionally with
                          :smoke (CONFIG). Required.
  --workdir PATH          run folder on a file system that all nodes share
                          (WORKDIR). Required.
  --mode MODE             train | evaluate | sample | pipeline (MODE, default train).
  --python PATH           Python on the nodes, e.g. a virtual environment's
                          (PYTHON, default python3).
  --dry-run               print the sbatch and srun commands instead of running
                          them (DRY_RUN=1); needs no SLURM.
  -h, --help              print this help.

Everything after `--` goes to mcd_jax.main, e.g. -- --config.train.num_steps=1000.
XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.90 here (JAX's own default is 0.75).

Example:
  launch/slurm_gpu.sh --nodes 2 --gpus_per_node 8 --partition gpu --time 48:00:00 \
      --config configs/owt_gpt2_small.py --workdir /shared/runs/owt \
      -- --config.data.tokenizer_path=/shared/gpt2
EOF
}

die() {
  echo "error: $*" >&2
  echo "Run launch/slurm_gpu.sh --help for the options." >&2
  exit 2
}

NODES="${NODES:-${SLURM_JOB_NUM_NODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TIME="${TIME:-24:00:00}"
PARTITION="${PARTITION:-}"
ACCOUNT="${ACCOUNT:-}"
JOB_NAME="${JOB_NAME:-mcd_jax}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
MODE="${MODE:-train}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
SBATCH_ARGS=()
EXTRA_FLAGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus_per_node) GPUS_PER_NODE="${2:?--gpus_per_node needs a value}"; shift 2 ;;
    --time) TIME="${2:?--time needs a value}"; shift 2 ;;
    --partition) PARTITION="${2:?--partition needs a value}"; shift 2 ;;
    --account) ACCOUNT="${2:?--account needs a value}"; shift 2 ;;
    --job_name) JOB_NAME="${2:?--job_name needs a value}"; shift 2 ;;
    --sbatch_arg) SBATCH_ARGS+=("${2:?--sbatch_arg needs a value}"); shift 2 ;;
    --sbatch_arg=*) SBATCH_ARGS+=("${1#--sbatch_arg=}"); shift ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) MODE="${2:?--mode needs a value}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    *) die "unknown option '$1'." ;;
  esac
done

# ---- Check the arguments ----
[[ -n "${CONFIG}" ]] || die "missing --config (or CONFIG), e.g. configs/owt_gpt2_small.py."
[[ -n "${WORKDIR}" ]] || die "missing --workdir (or WORKDIR), a folder all nodes share."
[[ "${NODES}" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '${NODES}'."
[[ "${GPUS_PER_NODE}" =~ ^[1-9][0-9]*$ ]] \
  || die "--gpus_per_node must be a positive integer, got '${GPUS_PER_NODE}'."
[[ -f "${REPO_ROOT}/${CONFIG%%:*}" ]] || die "config file '${CONFIG%%:*}' not found under \
${REPO_ROOT}."
case "${MODE}" in
  train|evaluate|sample|pipeline) ;;
  *) die "invalid --mode '${MODE}'; choose train, evaluate, sample or pipeline." ;;
esac
NUM_GPUS=$((NODES * GPUS_PER_NODE))
# srun starts in the repository root, so a relative run folder is made
# absolute here. The submitted job starts in the submission folder, so both
# phases resolve it the same way.
if [[ "${WORKDIR}" != /* && "${WORKDIR}" != *://* ]]; then
  WORKDIR="${PWD}/${WORKDIR}"
fi

# Quotes each word for a POSIX shell, leaving plain words bare so printed
# commands stay readable, and joins them with spaces.
quote_words() {
  local word quoted=()
  for word in "$@"; do
    if [[ "${word}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      quoted+=("${word}")
    else
      quoted+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${quoted[*]}"
}

# ---- The command every process runs ----
# One task per GPU: JAX 0.10 sets local_device_ids=[SLURM_LOCALID] under
# SLURM (jax/_src/clusters/cluster.py), so a single task per node would use
# only its node's first GPU. Do not add --gpus-per-task: SLURM usually binds
# one GPU to each task then, and GPU index SLURM_LOCALID would not be visible.
SRUN=(srun --nodes="${NODES}" --ntasks-per-node="${GPUS_PER_NODE}" --kill-on-bad-exit=1
      --chdir="${REPO_ROOT}"
      "${PYTHON}" -m mcd_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" --mode="${MODE}"
      --platform=gpu --min_devices="${NUM_GPUS}"
      "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}")

# ---- Outside an allocation: submit this script ----
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  SBATCH=(sbatch --job-name="${JOB_NAME}" --nodes="${NODES}"
          --ntasks-per-node="${GPUS_PER_NODE}" --gpus-per-node="${GPUS_PER_NODE}"
          --time="${TIME}" --output="${JOB_NAME}-%j.out"
          --export="ALL,MCD_REPO_ROOT=${REPO_ROOT}")
  if [[ -n "${PARTITION}" ]]; then
    SBATCH+=(--partition="${PARTITION}")
  fi
  if [[ -n "${ACCOUNT}" ]]; then
    SBATCH+=(--account="${ACCOUNT}")
  fi
  # The job gets the same arguments, without --dry-run.
  JOB_ARGS=()
  for arg in "${ORIGINAL_ARGS[@]+"${ORIGINAL_ARGS[@]}"}"; do
    if [[ "${arg}" != --dry-run && "${arg}" != --dry_run ]]; then
      JOB_ARGS+=("${arg}")
    fi
  done
  SBATCH+=("${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}" "${SCRIPT}" "${JOB_ARGS[@]+"${JOB_ARGS[@]}"}")

  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "+ $(quote_words "${SBATCH[@]}")"
    echo "# dry run: inside the allocation the job runs"
    echo "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
    echo "+ $(quote_words "${SRUN[@]}")"
    exit 0
  fi
  command -v sbatch >/dev/null 2>&1 \
    || die "sbatch not found on PATH. Run this on a SLURM login node, or use --dry-run."
  echo "+ $(quote_words "${SBATCH[@]}")"
  exec "${SBATCH[@]}"
fi

# ---- Inside an allocation: one process per GPU ----
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
echo "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION}"
echo "+ $(quote_words "${SRUN[@]}")"
if [[ "${DRY_RUN}" == 1 ]]; then
  exit 0
fi
command -v srun >/dev/null 2>&1 || die "srun not found on PATH inside job ${SLURM_JOB_ID}."
exec "${SRUN[@]}"
