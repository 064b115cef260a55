#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests and the demo.
#
#   slurm/local_cluster.sh start    install (apt, root only) if needed, then start munge, MariaDB,
#                                   slurmdbd, slurmctld and slurmd; waits until the node is idle
#   slurm/local_cluster.sh stop     stop the daemons this script started
#   slurm/local_cluster.sh status   exit 0 when the cluster answers and its node is usable
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` for clients (sbatch, sacct, ...)
#
# Every command is idempotent. State lives under $SIGSCALE_SLURM_DIR (default /tmp/sigscale-slurm).
# Exit status 3 means "cannot run here" (not root, no apt): the Slurm tests then skip, except
# under CI=true where they fail.
#
# Choices that matter (found on Debian 12, Slurm 22.05, no systemd, no cgroups):
# - submitit reads job states with sacct: without slurmdbd accounting a job that dies without a
#   result makes job.result() wait forever, so MariaDB + slurmdbd run too (MariaDB on 127.0.0.1).
# - proctrack/linuxproc + task/none: no cgroup hierarchy is available in the container.
# - AuthInfo=cred_expire=10 and sched_interval/bf_interval=2: a requeued job starts again after
#   ~12 s instead of the 120 s credential expiry.
# - The node declares the machine's real CPU count (2 here), so a 2-task training job fits.
set -euo pipefail

DIR="${SIGSCALE_SLURM_DIR:-/tmp/sigscale-slurm}"
CLUSTER=sigscale
NODE=localhost
DB_PORT="${SIGSCALE_SLURM_DB_PORT:-3307}"
CTLD_PORT="${SIGSCALE_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${SIGSCALE_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${SIGSCALE_SLURM_DBD_PORT:-6819}"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
export SLURM_CONF="$DIR/etc/slurm.conf"

log() { echo "local_cluster: $*" >&2; }

alive() {  # alive PIDFILE: the process named in PIDFILE is running (ps, not kill -0: works for non-root)
    [[ -s "$1" ]] && ps -p "$(cat "$1")" >/dev/null 2>&1
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$what did not come up within the time limit; see the logs in $DIR/log"
            return 1
        fi
        sleep 0.5
    done
}

install() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
        command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$bin" >/dev/null 2>&1 \
            || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "Slurm is not installed (missing: ${missing[*]}) and installing it needs root and apt-get."
        log "Run 'sudo $0 start' once (Debian/Ubuntu), or point SLURM_CONF at an existing cluster."
        exit 3
    fi
    log "installing ${PACKAGES[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_configs() {
    mkdir -p "$DIR"/{etc,log,run,state,spool,mysql,munge}
    local cpus
    cpus=$(nproc --all)
    cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read
    cat >"$DIR/etc/my.cnf" <<EOF
[mysqld]
datadir=$DIR/mysql
socket=$DIR/run/mysqld.sock
pid-file=$DIR/run/mysqld.pid
log-error=$DIR/log/mysqld.log
bind-address=127.0.0.1
port=$DB_PORT
user=root
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=32M
innodb_log_file_size=16M
innodb_lock_wait_timeout=900
max_connections=50
EOF
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return 0
    # The default socket path: Slurm's accounting clients (sacct, sacctmgr) ignore AuthInfo=socket=.
    mkdir -p /run/munge
    chown munge:munge "$DIR/munge" /run/munge
    runuser -u munge -- /usr/sbin/munged \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munge.seed"
    wait_for 20 munged munge -n
}

start_mariadb() {
    if ! [[ -d "$DIR/mysql/mysql" ]]; then
        mariadb-install-db --defaults-file="$DIR/etc/my.cnf" --auth-root-authentication-method=normal \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
    fi
    if ! alive "$DIR/run/mysqld.pid"; then
        setsid /usr/sbin/mariadbd --defaults-file="$DIR/etc/my.cnf" </dev/null >/dev/null 2>&1 &
    fi
    wait_for 60 MariaDB mariadb --socket="$DIR/run/mysqld.sock" -uroot -e "SELECT 1"
    # slurmdbd connects over TCP as root without a password; the server only listens on 127.0.0.1.
    mariadb --socket="$DIR/run/mysqld.sock" -uroot -e \
        "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1';
         CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
}

start_slurmdbd() {
    if ! alive "$DIR/run/slurmdbd.pid"; then
        /usr/sbin/slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    fi
    wait_for 60 slurmdbd sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurm() {
    alive "$DIR/run/slurmctld.pid" || /usr/sbin/slurmctld -f "$SLURM_CONF"
    wait_for 60 slurmctld scontrol ping
    alive "$DIR/run/slurmd.pid" || /usr/sbin/slurmd -f "$SLURM_CONF" -N "$NODE"
    wait_for 60 "node $NODE" node_usable
}

node_usable() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null) || return 1
    case "$state" in
        idle*|mixed*|allocated*|completing*) return 0 ;;
        down*|drain*|fail*)  # a node left down by an earlier unclean stop comes back on its own here
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;
    esac
}

cmd_start() {
    if cmd_status 2>/dev/null; then  # already up (this also lets a non-root user reuse it)
        log "up: export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    install
    [[ $(id -u) -eq 0 ]] || { log "starting the daemons needs root (slurmd runs jobs as any user)"; exit 3; }
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    log "up: export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile PIDFILE: TERM the process, wait up to 30 s, then KILL it
    alive "$1" || { rm -f "$1"; return 0; }
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

cmd_stop() {
    stop_pidfile "$DIR/run/slurmd.pid"
    stop_pidfile "$DIR/run/slurmctld.pid"
    stop_pidfile "$DIR/run/slurmdbd.pid"
    stop_pidfile "$DIR/run/mysqld.pid"
    stop_pidfile "$DIR/munge/munged.pid"
    log "stopped"
}

cmd_status() {
    # Ask the daemons themselves (works for any user): munge, slurmctld, slurmdbd (+ MariaDB behind it).
    munge -n >/dev/null 2>&1 || { log "munged does not answer"; return 1; }
    scontrol ping >/dev/null 2>&1 || { log "slurmctld does not answer (SLURM_CONF=$SLURM_CONF)"; return 1; }
    sacctmgr -n list cluster >/dev/null 2>&1 || { log "slurmdbd does not answer: no accounting"; return 1; }
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null) || true
    [[ "$state" =~ ^(idle|mixed|allocated|completing) ]] || { log "node $NODE is not usable (state: ${state:-?})"; return 1; }
    log "up: export SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 64 ;;
esac
