#!/usr/bin/env bash
# selfplay-jax on a multi-host Cloud TPU slice (TPU VMs): create the slice, install the code on
# every worker, run the same command on all of them (jax.distributed finds the other hosts by
# itself), watch, stop, delete. See launch/README.md.
set -euo pipefail

prog=${0##*/}
repo_root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog COMMAND [ARGS...]

Commands:
  create               create the TPU slice (gcloud compute tpus tpu-vm create)
  install              on every worker: copy this checkout (or git clone \$REPO_URL) to
                       ~/\$REMOTE_DIR, make a venv there with \`pip install -e . "jax[tpu]"\`,
                       and, when \$BUCKET is set, install gcsfuse and mount the bucket at \$MOUNT
  run [ARGS...]        on every worker, in the background (it survives the ssh session):
                       python -m selfplay_jax.cli train --config=\$CONFIG --workdir=\$WORKDIR
                       --distributed=on \$EXTRA ARGS...   (output in ~/\$REMOTE_DIR/run.log)
  status               on every worker: running (pid) or the exit status of the last run
  logs [WORKER]        follow run.log of WORKER (default 0; only process 0 writes the run's logs)
  stop                 SIGTERM to the run on every worker: the round in flight is finished and
                       saved, exit 143; \`run\` again resumes from it
  ssh [WORKER] [-- COMMAND...]
                       a shell (or COMMAND) on WORKER (default 0)
  delete               delete the TPU slice

Environment:
  TPU_NAME          name of the slice (required)
  ZONE              zone, e.g. us-west4-a (required)
  PROJECT           project (default: gcloud's configured project)
  ACCELERATOR_TYPE  for create (default v5litepod-16; e.g. v5litepod-64, v4-32, v6e-16)
  RUNTIME_VERSION   TPU VM software version for create (default v2-alpha-tpuv5-lite; it must
                    match the TPU generation, e.g. tpu-ubuntu2204-base for v4,
                    v2-alpha-tpuv6e for v6e)
  SPOT              1: create a Spot (preemptible) slice
  BUCKET            gs://BUCKET[/PATH] mounted with gcsfuse at \$MOUNT by install and run
  MOUNT             mount point on every worker (default /mnt/bucket)
  GCSFUSE_FLAGS     (default "--implicit-dirs --rename-dir-limit=200000")
  CONFIG            config file, relative to the repository (default configs/grpo.py)
  WORKDIR           run directory, the same path on every worker and on a filesystem all of
                    them see (default \$MOUNT/runs/\$TPU_NAME when BUCKET is set; required
                    otherwise). gs:// paths are not accepted: use BUCKET (gcsfuse).
  EXTRA             more selfplay-jax arguments, split on whitespace
  REPO_URL, REPO_REF  install with git clone REPO_URL, checked out at REPO_REF (a commit, tag
                    or origin/BRANCH; default origin/HEAD), instead of copying this checkout
                    (copied without .git, .venv, runs/)
  REMOTE_DIR        directory under the workers' home (default selfplay_jax)
  REMOTE_PYTHON     interpreter for the venv (default python3; jax needs Python >= 3.11, so
                    install falls back to apt's python3.11 when python3 is older)
  GCLOUD            gcloud binary (default gcloud)

Example:
  export TPU_NAME=sp-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 BUCKET=gs://my-bucket
  $prog create && $prog install
  $prog run --config.model.dtype=bfloat16
  $prog logs
EOF
}

die() {
  echo "$prog: $*" >&2
  exit 2
}
die_usage() {
  echo "$prog: $*" >&2
  echo "Try '$prog --help'." >&2
  exit 2
}
need() {  # need VAR...: each must be set and non-empty
  local var
  for var in "$@"; do
    [[ -n ${!var:-} ]] || die_usage "$var is not set (it names the TPU slice to use)"
  done
}

gcloud=${GCLOUD:-gcloud}
remote_dir=${REMOTE_DIR:-selfplay_jax}
mount=${MOUNT:-/mnt/bucket}
gcsfuse_flags=${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000}

where=()  # --zone (and --project) for every gcloud tpu-vm command; filled in below
tpu=()    # TPU_NAME and $where

on_workers() {  # on_workers WORKER SCRIPT: run the bash SCRIPT on WORKER ("all": every worker)
  "$gcloud" compute tpus tpu-vm ssh "${tpu[@]}" "--worker=$1" --command="$2"
}

quote() {  # quote ARGS...: one string, each argument quoted for a remote bash
  local out
  printf -v out ' %q' "$@"
  printf '%s' "${out# }"
}

# The bash lines that mount $BUCKET at $MOUNT on a worker, unless it is mounted already.
mount_script() {
  [[ -n ${BUCKET:-} ]] || return 0
  local bucket=${BUCKET#gs://} sub=
  if [[ $bucket == */* ]]; then
    sub=${bucket#*/}
    bucket=${bucket%%/*}
  fi
  local flags=()
  read -r -a flags <<<"$gcsfuse_flags"
  [[ -z $sub ]] || flags+=("--only-dir=$sub")
  cat <<EOF
if ! mountpoint -q $(quote "$mount"); then
  sudo mkdir -p $(quote "$mount")
  sudo chown "\$(id -u):\$(id -g)" $(quote "$mount")
  gcsfuse $(quote "${flags[@]}" "$bucket" "$mount")
fi
EOF
}

cmd_create() {
  local args=("${tpu[@]}" "--accelerator-type=${ACCELERATOR_TYPE:-v5litepod-16}"
    "--version=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}")
  if [[ ${SPOT:-} == 1 ]]; then
    args+=(--spot)
  fi
  "$gcloud" compute tpus tpu-vm create "${args[@]}"
}

cmd_install() {
  local fetch
  if [[ -n ${REPO_URL:-} ]]; then
    fetch="if [ -d $(quote "$remote_dir")/.git ]; then git -C $(quote "$remote_dir") fetch -q origin
else git clone -q $(quote "$REPO_URL" "$remote_dir"); fi
git -C $(quote "$remote_dir") checkout -q $(quote "${REPO_REF:-origin/HEAD}")"
  else
    archive=$(mktemp "${TMPDIR:-/tmp}/selfplay_jax_src.XXXXXX")
    trap 'rm -f "$archive"' EXIT
    if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # The files git would commit (tracked + untracked, minus .gitignore: no venvs, runs, caches).
      git -C "$repo_root" ls-files -z --cached --others --exclude-standard |
        tar -czf "$archive" -C "$repo_root" --ignore-failed-read --null -T -
    else
      tar -czf "$archive" -C "$repo_root" --exclude=./.git --exclude='.venv*' --exclude=./runs \
        --exclude='__pycache__' --exclude='*.egg-info' .
    fi
    "$gcloud" compute tpus tpu-vm scp "${where[@]}" --worker=all "$archive" \
      "$TPU_NAME:selfplay_jax_src.tgz"
    fetch="mkdir -p $(quote "$remote_dir")
tar -xzf selfplay_jax_src.tgz -C $(quote "$remote_dir") && rm -f selfplay_jax_src.tgz"
  fi
  local gcsfuse_install=
  if [[ -n ${BUCKET:-} ]]; then
    # shellcheck disable=SC2016  # (expanded on the workers)
    gcsfuse_install='if ! command -v gcsfuse >/dev/null; then
  repo="gcsfuse-$(lsb_release -c -s)"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi'
  fi
  on_workers all "set -euo pipefail
$fetch
cd $(quote "$remote_dir")
py=$(quote "${REMOTE_PYTHON:-python3}")
if ! \"\$py\" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo \"\$py is missing or older than Python 3.11 (jax needs 3.11+): installing python3.11\" >&2
  sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
  py=python3.11
fi
[ -x .venv/bin/python ] || \"\$py\" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e . 'jax[tpu]'
$gcsfuse_install
$(mount_script)
echo \"\$(hostname): installed\""
}

cmd_run() {
  local workdir=${WORKDIR:-}
  if [[ -z $workdir ]]; then
    [[ -n ${BUCKET:-} ]] ||
      die_usage "set WORKDIR (a path every worker sees) or BUCKET (mounted at $mount)"
    workdir=$mount/runs/$TPU_NAME
  fi
  [[ $workdir != gs://* ]] ||
    die_usage "WORKDIR=$workdir: the run needs a file path; set BUCKET=gs://... and a WORKDIR under $mount"
  local extra=()
  read -r -a extra <<<"${EXTRA:-}"
  local cmd=(.venv/bin/python -m selfplay_jax.cli train "--config=${CONFIG:-configs/grpo.py}"
    "--workdir=$workdir" --distributed=on "${extra[@]}" "$@")
  on_workers all "set -euo pipefail
cd $(quote "$remote_dir")
$(mount_script)
if [ -f run.pid ] && kill -0 \"\$(cat run.pid)\" 2>/dev/null; then
  echo \"\$(hostname): a run is going (pid \$(cat run.pid)); use stop first\" >&2
  exit 1
fi
rm -f run.exit
nohup bash -c '\"\$@\" & echo \$! > run.pid; wait \$!; echo \$? > run.exit' run $(quote "${cmd[@]}") \\
  > run.log 2>&1 < /dev/null &
echo \"\$(hostname): started: $(quote "${cmd[@]}")\""
  echo "$prog: started on every worker; follow it with: $prog logs" >&2
}

cmd_status() {
  on_workers all "cd $(quote "$remote_dir") 2>/dev/null || { echo \"\$(hostname): not installed\"; exit 0; }
if [ -f run.pid ] && kill -0 \"\$(cat run.pid)\" 2>/dev/null; then
  echo \"\$(hostname): running (pid \$(cat run.pid))\"
elif [ -f run.exit ]; then
  echo \"\$(hostname): exited with status \$(cat run.exit) (0 done, 2 bad input, 3 diverged, 143/130 stopped after saving)\"
else
  echo \"\$(hostname): no run\"
fi"
}

cmd_logs() {
  local worker=${1:-0}
  [[ $worker =~ ^[0-9]+$ ]] || die_usage "logs: WORKER must be a worker number, got '$worker'"
  on_workers "$worker" "tail -n 200 -F $(quote "$remote_dir/run.log")"
}

cmd_stop() {
  on_workers all "cd $(quote "$remote_dir")
if [ -f run.pid ] && kill -TERM \"\$(cat run.pid)\" 2>/dev/null; then
  echo \"\$(hostname): sent SIGTERM to \$(cat run.pid)\"
else
  echo \"\$(hostname): no run going\"
fi"
}

cmd_ssh() {
  local worker=0
  if [[ $# -gt 0 && $1 != -- ]]; then
    worker=$1
    shift
  fi
  [[ $worker =~ ^[0-9]+$ ]] || die_usage "ssh: WORKER must be a worker number, got '$worker'"
  if [[ ${1:-} == -- ]]; then
    shift
  fi
  if (($# > 0)); then
    on_workers "$worker" "$(quote "$@")"
  else
    "$gcloud" compute tpus tpu-vm ssh "${tpu[@]}" "--worker=$worker"
  fi
}

cmd_delete() {
  "$gcloud" compute tpus tpu-vm delete "${tpu[@]}" --quiet
}

command=${1:-}
case $command in
  -h | --help | help)
    usage
    exit 0 ;;
  "")
    die_usage "missing COMMAND (create, install, run, status, logs, stop, ssh, delete)" ;;
  create | install | run | status | logs | stop | ssh | delete) shift ;;
  *)
    die_usage "unknown command '$command' (create, install, run, status, logs, stop, ssh, delete)" ;;
esac
case $command in
  run | ssh) ;;
  logs) (($# <= 1)) || die_usage "logs takes at most one argument (WORKER), got: $*" ;;
  *) (($# == 0)) || die_usage "$command takes no arguments, got: $*" ;;
esac
need TPU_NAME ZONE
command -v -- "$gcloud" >/dev/null 2>&1 ||
  die "$gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
where=("--zone=$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  where+=("--project=$PROJECT")
fi
tpu=("$TPU_NAME" "${where[@]}")
"cmd_$command" "$@"
