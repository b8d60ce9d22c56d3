#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (unless it exists), copies this repository to
# every worker, installs it, and runs the same mcd_jax command on all workers.
# Run ./launch/tpu_pod.sh --help for the options.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] [-- extra mcd_jax.main flags]

Creates the TPU VM NAME unless `gcloud compute tpus tpu-vm describe` finds it,
copies this repository to every worker (or clones --repo_url there), runs
pip install -e ".[tpu]", then starts on all workers:

  python3 -m mcd_jax.main --config=CONFIG --workdir=WORKDIR --platform=tpu
      --min_devices=N [--distributed=on] [extra flags]

Options (environment variable in brackets):
  --tpu_name NAME           TPU VM name (TPU_NAME). Required.
  --zone ZONE               zone, e.g. us-west4-a (ZONE). Required.
  --accelerator_type TYPE   slice type, e.g. v5litepod-64, v4-32, v5p-128
                            (ACCELERATOR_TYPE, default v5litepod-64).
  --runtime_version V       TPU software version (RUNTIME_VERSION). The default
                            depends on the type (Cloud TPU docs, "TPU software
                            versions"): v2 to v4 tpu-ubuntu2204-base,
                            v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                            v6e v2-alpha-tpuv6e.
  --project PROJECT         Google Cloud project (PROJECT, default: gcloud's).
  --config FILE             config file relative to the repository, optionally
                            with :smoke (CONFIG). Required.
  --workdir gs://PATH       run folder in Cloud Storage, shared by all workers
                            (WORKDIR). Required.
  --mode MODE               train | evaluate | sample | pipeline (MODE, default train).
  --repo_url URL            git clone URL instead of copying the local tree
                            (REPO_URL); --repo_ref sets the branch or commit
                            (REPO_REF, default main).
  --env KEY=VALUE           environment variable for the run on every worker,
                            e.g. TFDS_DATA_DIR=gs://bucket/tfds (repeatable).
  --spot                    create the slice as a Spot VM (SPOT=1).
  --skip_create             do not describe or create the TPU VM.
  --skip_install            do not copy or install the repository.
  --detach                  start the run with nohup on each worker, writing
                            ~/mcd_jax_run.log, and return at once.
  --dry-run                 print every command instead of running it (DRY_RUN=1);
                            needs no gcloud.
  -h, --help                print this help.

Everything after `--` goes to mcd_jax.main, e.g. -- --config.train.num_steps=1000.

Example:
  launch/tpu_pod.sh --tpu_name mcd --zone us-west4-a --accelerator_type v5litepod-64 \
      --config configs/owt_gpt2_small.py --workdir gs://my-bucket/owt \
      --env TFDS_DATA_DIR=gs://my-bucket/tfds -- --config.data.tokenizer_path=/data/gpt2
EOF
}

die() {
  echo "error: $*" >&2
  echo "Run launch/tpu_pod.sh --help for the options." >&2
  exit 2
}

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-64}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
MODE="${MODE:-train}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
SPOT="${SPOT:-0}"
DRY_RUN="${DRY_RUN:-0}"
SKIP_CREATE=0
SKIP_INSTALL=0
DETACH=0
RUN_ENV=()
EXTRA_FLAGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu_name) TPU_NAME="${2:?--tpu_name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator_type) ACCELERATOR_TYPE="${2:?--accelerator_type needs a value}"; shift 2 ;;
    --runtime_version) RUNTIME_VERSION="${2:?--runtime_version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) MODE="${2:?--mode needs a value}"; shift 2 ;;
    --repo_url) REPO_URL="${2:?--repo_url needs a value}"; shift 2 ;;
    --repo_ref) REPO_REF="${2:?--repo_ref needs a value}"; shift 2 ;;
    --env) RUN_ENV+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip_create) SKIP_CREATE=1; shift ;;
    --skip_install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    *) die "unknown option '$1'." ;;
  esac
done

# ---- Check the arguments ----
[[ -n "${TPU_NAME}" ]] || die "missing --tpu_name (or TPU_NAME)."
[[ -n "${ZONE}" ]] || die "missing --zone (or ZONE)."
[[ -n "${CONFIG}" ]] || die "missing --config (or CONFIG), e.g. configs/owt_gpt2_small.py."
[[ -n "${WORKDIR}" ]] || die "missing --workdir (or WORKDIR), a gs:// path."
# A slice has no shared file system, so the run folder must be in Cloud Storage.
# NOTE: mcd_jax/workdir.py and mcd_jax/metrics.py write config.json and
# metrics.jsonl with os and open(), which do not understand gs:// paths, so
# those files land in a local folder named gs: on worker 0 until they switch
# to a gs://-aware file API. Orbax checkpoints do support gs://.
[[ "${WORKDIR}" == gs://* ]] || die "--workdir must be a gs:// path that all workers can \
write, got '${WORKDIR}'."
[[ -f "${REPO_ROOT}/${CONFIG%%:*}" ]] || die "config file '${CONFIG%%:*}' not found under \
${REPO_ROOT}."
case "${MODE}" in
  train|evaluate|sample|pipeline) ;;
  *) die "invalid --mode '${MODE}'; choose train, evaluate, sample or pipeline." ;;
esac
for pair in "${RUN_ENV[@]+"${RUN_ENV[@]}"}"; do
  [[ "${pair}" == [A-Za-z_]*=* ]] || die "invalid --env '${pair}'; expected KEY=VALUE."
done

# ---- Devices and hosts of the slice type ----
# The number after the dash counts TensorCores for v2, v3, v4 and v5p (two per
# chip, and JAX shows one device per chip on v4 and v5p) and chips for v5e and
# v6e. Multi-host slices have 4 chips per host.
[[ "${ACCELERATOR_TYPE}" =~ ^(v[0-9a-z]+)-([0-9]+)$ ]] \
  || die "invalid --accelerator_type '${ACCELERATOR_TYPE}'; expected e.g. v5litepod-64."
FAMILY="${BASH_REMATCH[1]}"
SIZE="${BASH_REMATCH[2]}"
case "${FAMILY}" in
  v4|v5p) CHIPS=$((SIZE / 2)); DEVICES="${CHIPS}"; SINGLE_HOST_CHIPS=4 ;;
  v2|v3) CHIPS=$((SIZE / 2)); DEVICES="${SIZE}"; SINGLE_HOST_CHIPS=4 ;;
  v5litepod|v5e|v6e) CHIPS="${SIZE}"; DEVICES="${SIZE}"; SINGLE_HOST_CHIPS=8 ;;
  *) die "unknown TPU family '${FAMILY}' in '${ACCELERATOR_TYPE}'." ;;
esac
if [[ -z "${RUNTIME_VERSION}" ]]; then
  case "${FAMILY}" in
    v2|v3|v4) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod|v5e) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
  esac
fi
# JAX finds the other workers of a Cloud TPU VM through the metadata server,
# but `--distributed auto` in mcd_jax.main only looks at environment variables,
# so multi-host slices ask for jax.distributed explicitly.
MAIN_FLAGS=(--config="${CONFIG}" --workdir="${WORKDIR}" --mode="${MODE}" --platform=tpu
            --min_devices="${DEVICES}")
if (( CHIPS > SINGLE_HOST_CHIPS )); then
  MAIN_FLAGS+=(--distributed=on)
fi

# ---- Helpers ----
GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  LOCATION+=(--project="${PROJECT}")
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

print_command() {
  echo "+ $(quote_words "$@")"
}

run() {
  print_command "$@"
  if [[ "${DRY_RUN}" != 1 ]]; then
    "$@"
  fi
}

# Runs one shell command line on every worker of the slice.
on_all_workers() {
  run "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" "${LOCATION[@]}" --worker=all --command="$1"
}


if [[ "${DRY_RUN}" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH. Install the Google Cloud CLI, or use --dry-run."
fi

# ---- TPU VM ----
if [[ "${SKIP_CREATE}" != 1 ]]; then
  DESCRIBE=("${GCLOUD_TPU[@]}" describe "${TPU_NAME}" "${LOCATION[@]}" '--format=value(state)')
  CREATE=("${GCLOUD_TPU[@]}" create "${TPU_NAME}" "${LOCATION[@]}"
          --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
  if [[ "${SPOT}" == 1 ]]; then
    CREATE+=(--spot)
  fi
  if [[ "${DRY_RUN}" == 1 ]]; then
    print_command "${DESCRIBE[@]}"
    echo "# dry run: assuming the TPU VM does not exist yet"
    print_command "${CREATE[@]}"
  elif STATE="$("${DESCRIBE[@]}" 2>/dev/null)"; then
    echo "TPU VM ${TPU_NAME} exists (state ${STATE}); not creating it."
  else
    run "${CREATE[@]}"
  fi
fi

# ---- Code and install ----
REMOTE_DIR='mcd_jax'  # Relative to the home folder on each worker.
if [[ "${SKIP_INSTALL}" != 1 ]]; then
  if [[ -n "${REPO_URL}" ]]; then
    on_all_workers "rm -rf ${REMOTE_DIR} && git clone $(quote_words "${REPO_URL}") ${REMOTE_DIR} \
&& git -C ${REMOTE_DIR} checkout $(quote_words "${REPO_REF}")"
  else
    ARCHIVE="${TMPDIR:-/tmp}/mcd_jax_${TPU_NAME}.tar.gz"
    run tar -czf "${ARCHIVE}" -C "${REPO_ROOT}" --exclude=.git --exclude=.venv \
      --exclude=workdirs --exclude=__pycache__ .
    run "${GCLOUD_TPU[@]}" scp "${ARCHIVE}" "${TPU_NAME}:mcd_jax.tar.gz" "${LOCATION[@]}" \
      --worker=all
    on_all_workers "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} \
&& tar -xzf mcd_jax.tar.gz -C ${REMOTE_DIR}"
  fi
  on_all_workers "cd ${REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'"
fi

# ---- Run on every worker ----
MAIN_COMMAND="python3 -m mcd_jax.main $(quote_words "${MAIN_FLAGS[@]}" \
  "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}")"
if (( ${#RUN_ENV[@]} > 0 )); then
  MAIN_COMMAND="env $(quote_words "${RUN_ENV[@]}") ${MAIN_COMMAND}"
fi
if [[ "${DETACH}" == 1 ]]; then
  on_all_workers "cd ${REMOTE_DIR} && nohup ${MAIN_COMMAND} < /dev/null > ~/mcd_jax_run.log 2>&1 &"
  echo "Started on all workers; logs are in ~/mcd_jax_run.log on each worker."
else
  on_all_workers "cd ${REMOTE_DIR} && ${MAIN_COMMAND}"
fi
