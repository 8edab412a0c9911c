#!/usr/bin/env bash
# A single-node SLURM cluster (with accounting) for the `slurm` tests, on Debian, as root, without systemd.
#
#   bash .ci/slurm_cluster.sh up      # install slurm/munge/mariadb if missing, start everything, wait until usable
#   bash .ci/slurm_cluster.sh down    # stop exactly the daemons `up` started, remove their state
#   bash .ci/slurm_cluster.sh status  # exit status 0 when every daemon runs
#
# Every daemon runs in the foreground (-D/-F) under this script's control; its PID goes to $STATE/<name>.pid
# so `down` kills exactly it. Configs, databases, spools and logs live in $STATE (DAS_CLI_SLURM_STATE,
# default /tmp/das-cli-slurm); /etc/slurm/slurm.conf and slurmdbd.conf are symlinks to them while it is up,
# so sbatch, sinfo and sacct need no environment. Accounting (slurmdbd + mariadb) is there for `sacct`:
# submitit polls it to learn a job's state, and without it a job SLURM kills before it writes its result
# leaves the launcher waiting forever.
set -euo pipefail

STATE=${DAS_CLI_SLURM_STATE:-/tmp/das-cli-slurm}
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)  # stop order; start order is the reverse
DB_PORT=${DAS_CLI_SLURM_DB_PORT:-3307}
CLUSTER=dascli

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive <name>: its recorded PID runs
  local pid
  pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null
}

start() {  # start <name> <command...>: run in the foreground of its own session, record the PID
  local name=$1; shift
  alive "$name" && return 0
  setsid "$@" >"$STATE/log/$name.out" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

wait_for() {  # wait_for <daemon> <seconds> <command...>: until the command succeeds, while the daemon lives
  local name=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    "$@" >/dev/null 2>&1 && return 0
    alive "$name" || die "$name exited; see $STATE/log/$name.out"
    sleep 1
  done
  die "$name not ready after ${seconds}s (waiting for: $*); logs in $STATE/log"
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  # apt's "policy-rc.d denied execution of start" is expected: nothing starts through init scripts here.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

link_config() {  # link_config <file>: /etc/slurm/<file> -> $STATE/etc/<file>, refusing to replace a real one
  local target=/etc/slurm/$1
  if [ -e "$target" ] && [ "$(readlink "$target")" != "$STATE/etc/$1" ]; then
    die "$target exists and is not this test cluster's; refusing to replace it"
  fi
  ln -sfn "$STATE/etc/$1" "$target"
}

write_configs() {
  local node cpus memory
  node=$(hostname -s)
  # The node's real CPUs and memory, as slurmd itself detects them.
  read -r cpus memory < <(slurmd -C | awk '/^NodeName/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                                                          print v["CPUs"], v["RealMemory"] }')
  mkdir -p "$STATE"/{etc,log,ctld,spool,mysql}
  cat >"$STATE/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/ctld/slurmctld.pidfile
SlurmdPidFile=$STATE/spool/slurmd.pidfile
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd, no cgroups here: track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that asks for no memory is given all of the node's.
DefMemPerCPU=$((memory / cpus))
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
# submitit ignores SIGTERM; a requeued or cancelled job gets SIGKILL this many seconds later (default 30).
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$node
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/log/slurmdbd.pidfile
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 0600 "$STATE/etc/slurmdbd.conf"
  link_config slurm.conf
  link_config slurmdbd.conf
}

start_munge() {
  local key=/etc/munge/munge.key
  [ -s "$key" ] || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  chown munge:munge "$key"
  chmod 0400 "$key"
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
  wait_for munged 20 munge -n
}

start_mariadb() {
  # Its own data directory and port; reachable on 127.0.0.1 only, no grant tables (a throwaway test database).
  chown mysql:mysql "$STATE/mysql"
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --skip-test-db >"$STATE/log/mariadb-install.out" 2>&1 \
      || die "mariadb-install-db failed; see $STATE/log/mariadb-install.out"
  fi
  start mariadb /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --socket="$STATE/mysql/mysqld.sock" --pid-file="$STATE/mysql/mysqld.pid" --skip-grant-tables --innodb-lock-wait-timeout=900
  wait_for mariadb 60 mariadb --no-defaults --protocol=tcp -h 127.0.0.1 -P "$DB_PORT" -e "SELECT 1"
}

cluster_ready() {
  sinfo -h -N -o "%T" | grep -qx idle && sacct -n -X -S now-1minutes >/dev/null
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (installs packages, runs munged and slurmd)"
  if cluster_ready 2>/dev/null && alive slurmctld; then
    say "already up"
    return 0
  fi
  install_packages
  write_configs
  start_munge
  start_mariadb
  start slurmdbd /usr/sbin/slurmdbd -D
  wait_for slurmdbd 60 bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
  start slurmctld /usr/sbin/slurmctld -D -c
  wait_for slurmctld 60 scontrol ping
  start slurmd /usr/sbin/slurmd -D
  wait_for slurmd 90 cluster_ready
  say "up: $(sinfo -h -N -o '%N %c CPUs %m MB %T'); state in $STATE"
}

down() {
  local pid
  for name in "${DAEMONS[@]}"; do
    pid=$(cat "$STATE/$name.pid" 2>/dev/null) || continue
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$STATE/$name.pid"
  done
  for file in slurm.conf slurmdbd.conf; do
    [ "$(readlink /etc/slurm/$file 2>/dev/null)" = "$STATE/etc/$file" ] && rm -f "/etc/slurm/$file"
  done
  rm -rf "$STATE"
  say "down"
}

status() {  # exit status 0 when every daemon runs
  local stopped=0
  for name in "${DAEMONS[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; stopped=1; fi
  done
  return "$stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
