#!/usr/bin/env bash
# slurm-local.sh -- kdhpc's test fixture: a real SLURM cluster on localhost (no systemd; cgroups
# optional), used by tests/test_slurm.py and tests/test_sweep.py through .ci/slurm.sh.
# Derived from a recipe tested on Debian 12 bookworm (slurm-wlm 22.05.8, munge 0.5.15,
# MariaDB 10.11), run as root on a 2-core machine.
#
#   slurm-local.sh install          # apt-get the packages (idempotent)
#   slurm-local.sh start            # start the daemons; prints: export SLURM_CONF=$DIR/slurm.conf
#                                   # (clients need SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf exported)
#   slurm-local.sh stop             # cancel all jobs, stop every daemon by PID, wait for it
#   slurm-local.sh logs             # tail every daemon log (for CI failure output)
#
# Knobs (environment):
#   SLURM_LOCAL_DIR         everything lives here (default: ${TMPDIR:-/tmp}/slurm-local); it must
#                           be short (a unix socket lives below it) and o+x all the way up
#   SLURM_LOCAL_NODES       number of emulated nodes (default 1). >1 runs one slurmd per node on
#                           this host (slurmd -N), names node1..nodeN, adds them to /etc/hosts
#   SLURM_LOCAL_CPUS        CPUs to advertise per node (default: what slurmd -C sees). More than
#                           the hardware is allowed (SlurmdParameters=config_overrides)
#   SLURM_LOCAL_MEM         RealMemory (MB) to advertise per node; not enforced either way
#   SLURM_LOCAL_GPUS        fake GPUs per node (GRES gpu:N backed by /dev/null links): lets
#                           scripts with --gres=gpu:N / --gpus-per-node=N be scheduled on CPU CI;
#                           jobs get CUDA_VISIBLE_DEVICES=0,.. but no GPU exists
#   SLURM_LOCAL_PARTITIONS  partition names, first is the default (default: "debug")
#   SLURM_LOCAL_ACCOUNTING  1 = also run MariaDB + slurmdbd so that sacct works (submitit uses
#                           sacct to see jobs that died without writing a result)
#   SLURM_LOCAL_CGROUP      1 = cgroup v1 plugins: --mem is enforced (OOM kill), tasks are bound
#                           to cores. Needs the v1 controllers mounted under /sys/fs/cgroup and
#                           real CPU counts (do not combine with SLURM_LOCAL_CPUS > hardware)
#   SLURM_LOCAL_PORT        base port (default 6817): slurmctld=P, slurmd=P+1 (or P+10+i),
#                           slurmdbd=P+2, mariadb=P+3
set -euo pipefail

D=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}
P=${SLURM_LOCAL_PORT:-6817}
NODES=${SLURM_LOCAL_NODES:-1}
ACCT=${SLURM_LOCAL_ACCOUNTING:-0}
CGROUP=${SLURM_LOCAL_CGROUP:-0}
CONF=$D/slurm.conf
HOSTS_MARK="# slurm-local $D"
export SLURM_CONF=$CONF   # slurmdbd finds slurmdbd.conf next to it

log() { echo "slurm-local: $*" >&2; }

dump_logs() {
  for f in "$D"/log/*.log; do [ -f "$f" ] && { echo "==> $f <==" >&2; tail -n 40 "$f" >&2; }; done
  return 0
}

wait_for() {  # wait_for SECONDS WHAT CMD... : poll CMD every 0.2 s
  local end=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then log "timed out waiting for $what"; dump_logs; return 1; fi
    sleep 0.2
  done
}

do_install() {
  local pkgs="slurmctld slurmd slurm-client munge"
  [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  local missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  apt-get update -qq
  # Debian's postinst scripts try to start the services; without systemd/with policy-rc.d
  # that is refused (harmless). We start our own private instances below.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

node_names() {
  if [ "$NODES" = 1 ]; then hostname -s; else for i in $(seq 1 "$NODES"); do echo "node$i"; done; fi
}

all_idle() {
  local states; states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1   # 1 line per node+partition
  [ "$(grep -c ' idle$' <<<"$states")" = "$NODES" ]
}

alive() {  # a zombie counts as dead: the daemons are reparented to PID 1, which may reap late
  local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL
  local name=$1 f=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")          # read it first: slurm daemons delete their pid file while exiting
  if alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then log "$name ($pid) ignored SIGTERM, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

write_conf() {
  local host hw mem cpus nodes_lines="" overrides="" acct_lines i gres="" gpus=${SLURM_LOCAL_GPUS:-0}
  local parts=${SLURM_LOCAL_PARTITIONS:-debug} part_lines="" def=YES p
  host=$(hostname -s)
  hw=$(slurmd -C | head -n1)   # NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$((mem > 1024 ? mem - 512 : mem))       # a little below what slurmd measures
  cpus=${SLURM_LOCAL_CPUS:-$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")}
  [ "$NODES" = 1 ] || mem=$((mem / NODES))
  mem=${SLURM_LOCAL_MEM:-$mem}
  if [ "$gpus" != 0 ]; then
    # gres/gpu drops GPUs without File= and rejects files that are not char devices: use /dev/null links
    gres=" Gres=gpu:$gpus"
    mkdir -p "$D/fakegpu"
    for i in $(seq 0 $((gpus - 1))); do ln -sfn /dev/null "$D/fakegpu/nvidia$i"; done
    echo "Name=gpu File=$D/fakegpu/nvidia[0-$((gpus - 1))]" >"$D/gres.conf"   # read from next to slurm.conf
  fi
  for p in $parts; do
    part_lines+="PartitionName=$p Nodes=ALL Default=$def MaxTime=INFINITE State=UP"$'\n'; def=NO
  done
  if [ "$NODES" = 1 ] && [ -z "${SLURM_LOCAL_CPUS:-}${SLURM_LOCAL_MEM:-}" ] && [ "$gpus" = 0 ]; then
    # the exact hardware line, so slurmd's own check passes without config_overrides
    nodes_lines="$(sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" \
                       -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$hw") State=UNKNOWN"
  elif [ "$NODES" = 1 ]; then
    overrides="SlurmdParameters=config_overrides"
    nodes_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN"
  else
    overrides="SlurmdParameters=config_overrides"
    for i in $(seq 1 "$NODES"); do
      nodes_lines+="NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((P + 10 + i)) CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN"$'\n'
    done
  fi
  local track_lines="# no cgroups: processes tracked through /proc, no task binding, no usage sampling
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectTypeParameters=CR_Core"
  if [ "$CGROUP" = 1 ]; then
    track_lines="# cgroup v1: tasks confined to their cores and their memory (--mem), OOM-killed beyond it
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/cgroup
# memory is a consumable resource; without a default a job without --mem takes the whole node
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024"
    printf '%s\n' CgroupPlugin=cgroup/v1 CgroupMountpoint=/sys/fs/cgroup ConstrainCores=yes \
      ConstrainRAMSpace=yes >"$D/cgroup.conf"   # read from next to slurm.conf
  fi
  if [ "$ACCT" = 1 ]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((P + 2))
# for slurmdbd connections the munge socket is given here, not in AuthInfo
AccountingStoragePass=$D/munge/munge.socket.2"
  else
    acct_lines="AccountingStorageType=accounting_storage/none"
  fi
  cat >"$CONF" <<EOF
ClusterName=kdhpc
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$P
SlurmdPort=$((P + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
$track_lines
JobCompType=jobcomp/none
$acct_lines
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule every 2 s instead of 60 s (matters for requeued and dependent jobs)
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
# reject impossible requests (too many nodes/CPUs) at submit time instead of PENDING forever
EnforcePartLimits=ALL
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=600
GresTypes=gpu
$overrides
$nodes_lines
$part_lines
EOF

  if [ "$ACCT" = 1 ]; then
    cat >"$D/slurmdbd.conf" <<EOF
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$((P + 2))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket.2
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((P + 3))
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
DebugLevel=info
EOF
    chmod 600 "$D/slurmdbd.conf"   # slurmdbd refuses a world-readable config
  fi
}

add_hosts_entries() {  # node names must resolve: MASTER_ADDR=$(scontrol show hostnames ...)
  local missing="" n
  for n in $(node_names); do getent hosts "$n" >/dev/null || missing="$missing $n"; done
  [ -z "$missing" ] && return 0
  echo "127.0.0.1 $missing $HOSTS_MARK" >>/etc/hosts
}

remove_hosts_entries() {  # rewrite in place: /etc/hosts may be a bind mount (no sed -i)
  grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
  local tmp; tmp=$(mktemp); grep -vF "$HOSTS_MARK" /etc/hosts >"$tmp" || true
  cat "$tmp" >/etc/hosts; rm -f "$tmp"
}

do_start() {
  if [ -s "$D/run/slurmctld.pid" ] && alive "$(cat "$D/run/slurmctld.pid")"; then
    log "already running in $D"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  local port ports="$P $((P + 1)) $((P + 2)) $((P + 3))" i
  for i in $(seq 1 "$NODES"); do ports+=" $((P + 10 + i))"; done
  for port in $ports; do   # a leftover cluster would give "Address already in use"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      log "port $port on 127.0.0.1 is in use (another cluster still running?); set SLURM_LOCAL_PORT"
      return 1
    fi
  done
  # munged refuses a socket unless every directory above it is o+x, and a unix socket path must
  # stay under 108 bytes: pytest's tmp_path (0700 parents, long names) fails both
  local a=$D
  while [ "$a" != / ] && a=$(dirname "$a"); do
    case $(stat -c %A "$a") in *x | *t) ;; *) log "$a is not o+x; munged cannot use a socket below it (use mktemp -d under /tmp)"; return 1 ;; esac
  done
  if [ ${#D} -gt 80 ]; then log "SLURM_LOCAL_DIR is too long for a unix socket path: $D"; return 1; fi
  trap 'log "start failed, stopping what was started"; do_stop' EXIT   # no half-started cluster
  rm -rf "$D/ctld" "$D/spool" "$D/run"
  mkdir -p "$D"/{munge,ctld,spool,log,run}
  for n in $(node_names); do mkdir -p "$D/spool/$n"; done
  chmod 755 "$D" "$D/munge"   # mktemp -d gives 0700, munged needs o+x down to its socket

  # 1. munge: private key and socket; the system munged (if any) is left alone
  if [ ! -s "$D/munge/munge.key" ]; then
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$D/munge/munge.key"
  fi
  munged --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket.2" \
         --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" \
         --seed-file="$D/munge/munged.seed"
  wait_for 10 munged sh -c "munge -n -S '$D/munge/munge.socket.2' | unmunge -S '$D/munge/munge.socket.2'"

  write_conf
  add_hosts_entries

  # 2. optional accounting: MariaDB (private datadir, TCP on 127.0.0.1 only) + slurmdbd
  if [ "$ACCT" = 1 ]; then
    # The controller starts with no state (job ids from 1 again), so the accounting database
    # must too: a job id that sacct still knew from an earlier start would report that old
    # job's state (submitit would take a running job for a finished one).
    rm -rf "$D/mysql"
    if [ ! -d "$D/mysql/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$D/mysql" --user=root \
        --auth-root-authentication-method=normal --skip-test-db >"$D/log/mariadb-install.log" 2>&1
    fi
    setsid mariadbd --no-defaults --datadir="$D/mysql" --user=root --skip-name-resolve \
      --bind-address=127.0.0.1 --port=$((P + 3)) --socket="$D/run/mariadb.sock" \
      --pid-file="$D/run/mariadb.pid" --log-error="$D/log/mariadb.log" \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb mariadb --no-defaults -h127.0.0.1 -P$((P + 3)) -uroot -e 'select 1'
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster kdhpc >/dev/null 2>&1 || true   # fails harmlessly if it exists
  fi

  # 3. slurmctld, then one slurmd per node (all daemonize themselves and write pid files)
  slurmctld
  wait_for 30 slurmctld sh -c "scontrol ping | grep -q UP"
  if [ "$NODES" = 1 ]; then slurmd; else for n in $(node_names); do slurmd -N "$n"; done; fi
  wait_for 60 "nodes idle" all_idle
  trap - EXIT
  log "up: $(sinfo -h -N -o '%N=%T/cpus=%c/gres=%G' | sort -u | tr '\n' ' ')"
  echo "export SLURM_CONF=$CONF"
}

do_stop() {
  if [ -f "$CONF" ] && scontrol ping 2>/dev/null | grep -q UP; then
    scancel "--user=$(id -un)" 2>/dev/null || true
    local end=$((SECONDS + 30))
    while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && ((SECONDS < end)); do sleep 0.5; done
  fi
  local f
  for f in "$D"/run/slurmd-*.pid; do stop_pid slurmd "$f"; done
  stop_pid slurmctld "$D/run/slurmctld.pid"
  stop_pid slurmdbd "$D/run/slurmdbd.pid"
  stop_pid mariadbd "$D/run/mariadb.pid"
  stop_pid munged "$D/run/munged.pid"
  remove_hosts_entries
  local n   # cgroup mode leaves empty /sys/fs/cgroup/<controller>/slurm_<node> directories
  for n in $(node_names); do
    for f in /sys/fs/cgroup/*/"slurm_$n"; do
      [ -d "$f" ] && find "$f" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
  done
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  logs) dump_logs ;;
  *) echo "usage: $0 install|start|stop|logs" >&2; exit 2 ;;
esac
