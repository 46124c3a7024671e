#!/usr/bin/env bash
# Multi-host on one machine: starts NUM_PROCESSES selfplay-jax processes on the CPU, each with
# DEVICES_PER_PROCESS fake devices, joined by jax.distributed into one global mesh. Used to test
# multi-host code paths (sharded data, process-0-only logging, multi-host checkpoints, preemption)
# without a pod or a cluster. See launch/README.md.
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<EOF
Usage: $prog [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] [-g SECONDS]
       ${prog//?/ } -- SELFPLAY_JAX_ARGS...

Starts NUM_PROCESSES copies of
    \${PYTHON:-python} -m selfplay_jax.cli SELFPLAY_JAX_ARGS... \\
        --coordinator_address=localhost:PORT --num_processes=NUM_PROCESSES --process_id=I
on this machine, each with JAX_PLATFORMS=cpu and DEVICES_PER_PROCESS fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS), which jax.distributed
joins into one mesh of NUM_PROCESSES x DEVICES_PER_PROCESS devices.

Options:
  -n NUM_PROCESSES        processes to start (default 2)
  -d DEVICES_PER_PROCESS  fake CPU devices per process (default 4)
  -p PORT                 coordinator port on localhost (default: a free port)
  -l LOG_DIR              where processes 1.. write LOG_DIR/selfplay_jax_local.<i>.log
                          (default \${LOG_DIR:-/tmp}); process 0 writes to this terminal
  -g SECONDS              after a process fails, how long the others get between SIGTERM and
                          SIGKILL (default 10)
  -h, --help              show this help

Environment:
  PYTHON     interpreter that has selfplay_jax installed (default: python, i.e. the active venv)
  LOG_DIR    default for -l
  XLA_FLAGS  kept, except any --xla_force_host_platform_device_count, which -d replaces

Exit status: 0 when every process exits 0. When a process fails, the others are stopped
(SIGTERM, then SIGKILL after -g seconds) and $prog exits with the failed process's status.
SIGTERM, SIGINT (and SIGHUP, as SIGTERM) sent to $prog are forwarded once to every process;
$prog then waits for all of them and exits with the first non-zero status among them
(143 / 130: stopped after saving; rerunning the same command resumes). A process that exits
130 or 143 by itself does not stop the others (under jax.distributed they all stop at the
same round). 2: bad usage.

Example (2 processes x 4 devices = one 8-device mesh, 2-way data x 4-way fsdp):
  $prog -n 2 -d 4 -- train --config=configs/grpo.py --workdir=runs/local-2x4 \\
      --config.mesh.data=2 --config.mesh.fsdp=4
EOF
}

die_usage() {
  echo "$prog: $*" >&2
  echo "Try '$prog --help'." >&2
  exit 2
}

check_number() {  # check_number OPTION VALUE MIN MAX WHAT
  if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3 || 10#$2 > $4)); then
    die_usage "$1 must be $5, got '$2'"
  fi
}

num_processes=2
devices=4
port=
log_dir=${LOG_DIR:-/tmp}
grace=10

if [[ ${1:-} == --help ]]; then
  usage
  exit 0
fi
while getopts ':n:d:p:l:g:h' opt; do
  case $opt in
    n) num_processes=$OPTARG ;;
    d) devices=$OPTARG ;;
    p) port=$OPTARG ;;
    l) log_dir=$OPTARG ;;
    g) grace=$OPTARG ;;
    h) usage; exit 0 ;;
    :) die_usage "option -$OPTARG needs a value" ;;
    *) die_usage "unknown option -$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))

check_number -n "$num_processes" 1 100000 "a whole number >= 1"
check_number -d "$devices" 1 100000 "a whole number >= 1"
check_number -g "$grace" 0 1000000 "a whole number of seconds"
if [[ -n $port ]]; then
  check_number -p "$port" 1 65535 "a port number (1-65535)"
fi
num_processes=$((10#$num_processes)) devices=$((10#$devices)) grace=$((10#$grace))
(($# > 0)) || die_usage "missing the selfplay-jax arguments after --, e.g. -- train --config=..."
for arg in "$@"; do
  case $arg in
    --coordinator_address | --coordinator_address=* | --num_processes | --num_processes=* | \
      --process_id | --process_id=*)
      die_usage "$prog sets ${arg%%=*} itself; leave it out of the selfplay-jax arguments" ;;
  esac
done
mkdir -p -- "$log_dir" || die_usage "cannot create the log directory '$log_dir'"

# A free port: try random ones in 20000-31999 (below Linux's ephemeral range) until nothing on
# localhost accepts a connection there.
if [[ -z $port ]]; then
  for _ in {1..100}; do
    port=$((20000 + RANDOM % 12000))
    if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      break
    fi
  done
fi
port=$((10#$port))

# XLA_FLAGS: the caller's flags minus any previous device count, plus ours.
xla_flags=()
read -r -a old_flags <<<"${XLA_FLAGS:-}"
for flag in "${old_flags[@]}"; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$flag")
done
xla_flags+=("--xla_force_host_platform_device_count=$devices")

python=${PYTHON:-python}
command -v -- "$python" >/dev/null 2>&1 ||
  die_usage "PYTHON=$python is not an executable (set PYTHON to the interpreter of your venv)"
# Each process gets its own process group (setsid) so that a Ctrl-C in this terminal reaches
# them once, through this script, and so that stopping one also stops what it started.
setsid_cmd=()
if command -v setsid >/dev/null 2>&1; then
  setsid_cmd=(setsid)
fi

pids=()
statuses=()
signalled=
stop_deadline=
first_failure=

pending_signal=
launching=1
# shellcheck disable=SC2317  # (invoked by the traps below)
on_signal() {  # on_signal(SIGNAL): while starting, remember it; after, forward it
  if [[ -n $launching ]]; then
    pending_signal=$1
  else
    forward "$1"
  fi
}

forward() {  # forward(SIGNAL): once per signal received, to every process still running
  local sig=$1 i
  signalled=1
  echo "$prog: received SIG$sig; forwarding it to the $num_processes processes" >&2
  for i in "${!pids[@]}"; do
    [[ -n ${statuses[i]} ]] || kill -s "$sig" "${pids[i]}" 2>/dev/null || true
  done
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal TERM' HUP

stop_others() {  # stop_others(): SIGTERM now, SIGKILL to their process groups after $grace s
  local i
  for i in "${!pids[@]}"; do
    [[ -n ${statuses[i]} ]] || kill -s TERM "${pids[i]}" 2>/dev/null || true
  done
  stop_deadline=$((SECONDS + grace))
}

kill_group() {  # kill_group(PID): SIGKILL to PID's process group (or PID when it has none)
  kill -s KILL -- "-$1" 2>/dev/null || kill -s KILL "$1" 2>/dev/null || true
}

echo "$prog: starting $num_processes processes x $devices CPU devices, coordinator" \
  "localhost:$port; process 0 writes here, processes 1.. to $log_dir/selfplay_jax_local.<i>.log" >&2
for ((i = 0; i < num_processes; i++)); do
  cmd=("${setsid_cmd[@]}" "$python" -m selfplay_jax.cli "$@"
    "--coordinator_address=localhost:$port" "--num_processes=$num_processes" "--process_id=$i")
  if ((i == 0)); then
    JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags[*]}" "${cmd[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags[*]}" "${cmd[@]}" \
      >"$log_dir/selfplay_jax_local.$i.log" 2>&1 </dev/null &
  fi
  pids+=("$!")
  statuses+=("")
done
launching=
if [[ -n $pending_signal ]]; then
  forward "$pending_signal"
fi

running=$num_processes
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    [[ -z ${statuses[i]} ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    status=0
    wait "${pids[i]}" || status=$?
    statuses[i]=$status
    running=$((running - 1))
    where="see $log_dir/selfplay_jax_local.$i.log"
    ((i > 0)) || where="its output is above"
    if ((status != 0)) && [[ -z $first_failure ]]; then
      first_failure=$status
      if [[ -z $signalled ]] && ((status != 130 && status != 143)); then
        echo "$prog: process $i exited with status $status ($where); stopping the others" >&2
        stop_others
      else
        echo "$prog: process $i exited with status $status ($where)" >&2
      fi
    elif ((status != 0)); then
      echo "$prog: process $i exited with status $status ($where)" >&2
    fi
  done
  ((running > 0)) || break
  if [[ -n $stop_deadline ]] && ((SECONDS >= stop_deadline)); then
    for i in "${!pids[@]}"; do
      [[ -n ${statuses[i]} ]] || kill_group "${pids[i]}"
    done
    stop_deadline=
  fi
  sleep 0.2
done
# What the processes started (their process groups) goes with them.
for pid in "${pids[@]}"; do
  kill -s KILL -- "-$pid" 2>/dev/null || true
done
exit "${first_failure:-0}"
