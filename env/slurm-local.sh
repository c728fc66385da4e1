#!/usr/bin/env bash
# A real one-node SLURM on this machine, for trying the job scripts under jobs/slurm/
# (and for tests/test_slurm.py).  Debian 12: slurm-wlm + munge.
#
#   env/slurm-local.sh start     install if missing, configure, start munged, slurmctld and
#                                slurmd, wait until the node is idle, print their pids
#   env/slurm-local.sh env       print the 'export SLURM_CONF=...' line clients need
#   env/slurm-local.sh status    print the daemons' pids and sinfo
#   env/slurm-local.sh stop      cancel remaining jobs, stop the daemons this script started
#                                (by the pids it recorded) and wait until they are gone
#
# Everything lives in one state directory, ${HPCQML_SLURM_DIR:-/tmp/hpcqml-slurm}: the
# slurm.conf (clients find it through SLURM_CONF; /etc/slurm is not touched), a private
# munge key and socket, spool and state directories, logs, and the pid files.  Only
# processes started here are ever stopped, by the pids recorded in that directory.
# Ports: HPCQML_SLURMCTLD_PORT (default 6817) and HPCQML_SLURMD_PORT (default 6818).
set -euo pipefail

dir="${HPCQML_SLURM_DIR:-/tmp/hpcqml-slurm}"
ctld_port="${HPCQML_SLURMCTLD_PORT:-6817}"
slurmd_port="${HPCQML_SLURMD_PORT:-6818}"
conf="$dir/slurm.conf"
host="$(hostname -s)"

log() { echo "[slurm-local] $*" >&2; }
die() { echo "[slurm-local] error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE -> true when the pid in it is a live process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them"
  local sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  log "installing slurm-wlm munge (apt-get)"
  $sudo_cmd apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

write_config() {
  mkdir -p "$dir"/{munge,ctld,spool,log}
  chmod 700 "$dir/munge"
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$dir/munge/munge.key"
  local cpus mem_mb
  cpus="$(nproc --all)"  # --all: OMP_NUM_THREADS must not shrink the node
  # Advertise 90% of the physical memory so that '#SBATCH --mem' requests are checked
  # against what the machine really has.
  mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 * 0.9 / 1024}' /proc/meminfo)"
  cat >"$conf" <<EOF
# written by env/slurm-local.sh: a one-node SLURM for hpcqml's job scripts
ClusterName=hpcqml-local
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start() {
  install_if_missing
  if alive "$dir/slurmctld.pid" || alive "$dir/slurmd.pid"; then
    log "already running (state in $dir)"
    status
    return 0
  fi
  write_config
  export SLURM_CONF="$conf"
  if ! alive "$dir/munged.pid"; then
    # --force: no dedicated munge user is needed when run as root.
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
      --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" \
      --seed-file="$dir/munge/munged.seed" 2>>"$dir/log/munged.stderr" \
      || die "munged did not start (see $dir/log/munged.log)"
  fi
  # -c: start from an empty job state (a fresh local cluster each time).
  slurmctld -c -f "$conf" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
  slurmd -f "$conf" || die "slurmd did not start (see $dir/log/slurmd.log)"
  local i state=""
  for i in $(seq 1 60); do
    state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in idle|mixed|allocated) break ;; esac
    sleep 0.5
  done
  case "$state" in
    idle|mixed|allocated) ;;
    *) die "node not ready after 30 s (state '${state:-none}'); logs in $dir/log" ;;
  esac
  log "node $host is $state; export SLURM_CONF=$conf before sbatch/squeue"
  pids
}

pids() {
  local name
  for name in munged slurmctld slurmd; do
    if alive "$dir/$name.pid"; then
      echo "$name $(cat "$dir/$name.pid")"
    fi
  done
}

status() {
  pids
  SLURM_CONF="$conf" sinfo 2>/dev/null || true
}

stop() {
  export SLURM_CONF="$conf"
  if alive "$dir/slurmctld.pid"; then
    scancel --full --quiet --partition=debug 2>/dev/null || true
    local i
    for i in $(seq 1 20); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  local name pid i
  for name in slurmd slurmctld munged; do
    alive "$dir/$name.pid" || continue
    pid="$(cat "$dir/$name.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ($pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stopped $name $pid"
  done
  rm -f "$dir"/{slurmd,slurmctld,munged}.pid
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
