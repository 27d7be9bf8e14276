#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's slurm-wlm and munge packages: for the tests, CI and
# trying the sbatch scripts out before a real cluster (where none of this is needed).
#     slurm/cluster.sh start     # install the packages if missing, configure this host, start the daemons
#     slurm/cluster.sh status    # sinfo
#     slurm/cluster.sh stop      # stop slurmd, slurmctld and munged by their process ids
# Needs root (it writes /etc/slurm and starts daemons). The configuration (../shared/NOTES-slurm.md has the facts
# behind it) is one node named after this host with its CPUs and 90% of its memory, in partition "debug"; an
# /etc/slurm/slurm.conf that this script did not write is left alone and refused.
set -euo pipefail

MARK="# written by stbp slurm/cluster.sh"
CONF=/etc/slurm/slurm.conf

fail() { echo "slurm/cluster.sh: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  echo "[slurm] installing slurm-wlm and munge (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
    || fail "could not install slurm-wlm and munge with apt-get"
}

configure() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  if [[ -f $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script: this machine has its own SLURM; leave it alone"
  fi
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat >"$CONF" <<CONFIG
$MARK
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONFIG
  printf '%s\nCgroupPlugin=autodetect\nIgnoreSystemd=yes\n' "$MARK" >/etc/slurm/cgroup.conf
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [[ $(id -u) == 0 ]] || fail "needs root: it writes /etc/slurm and starts daemons"
  install_packages
  configure
  if ! running /run/munge/munged.pid; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged
  fi
  munge -n | unmunge >/dev/null || fail "munge does not work (see /var/log/munge/munged.log)"
  running /run/slurmctld.pid || slurmctld
  running /run/slurmd.pid || slurmd
  for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1)
    if [[ $state == idle* || $state == mix* || $state == alloc* ]]; then
      echo "[slurm] node $(hostname -s) is $state: $(nproc) CPUs, partition debug"
      return
    fi
    sleep 1
  done
  fail "the node did not come up (state '${state:-none}'); see /var/log/slurm/slurmd.log and slurmctld.log"
}

stop() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if running "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
  done
  echo "[slurm] stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) fail "usage: slurm/cluster.sh start|stop|status" ;;
esac
