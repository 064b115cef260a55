#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests and the demo.
#
#   slurm/local_cluster.sh start    install (apt, root only) if needed, then start munge, MariaDB,
#                                   slurmdbd, slurmctld and slurmd; waits until the node is idle
#   slurm/local_cluster.sh stop     stop the daemons this script started
#   slurm/local_cluster.sh status   exit 0 when the cluster answers and its node is usable
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` for clients (sbatch, sacct, ...)
#
# With `two-node` after the command (start|stop|status|env two-node) the same is done for a second,
# separate cluster of two nodes, `node1` and `node2`: each slurmd runs in its own network namespace
# (sigscale-node1/2) and UTS namespace (its own hostname), with its own private address on a bridge this
# script creates ($SIGSCALE_SLURM_2N_NET.0/24, default 10.213.0.0/24; the controller is .1 on the
# bridge, the nodes .11 and .12). `stop two-node` removes the namespaces, the bridge and /etc/netns/*.
#   slurm/local_cluster.sh kill-node NODE two-node     cut NODE's link, then SIGKILL every process in
#                                                      its namespace (a node that dies: no FIN, no RST)
#   slurm/local_cluster.sh revive-node NODE two-node   link up, slurmd started again, node resumed
#
# Every command is idempotent. State lives under $SIGSCALE_SLURM_DIR (default /tmp/sigscale-slurm;
# two-node: $SIGSCALE_SLURM_2N_DIR, default /tmp/sigscale-slurm-2n).
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
# - Preemption as a site would configure it: partition `debug` (the default, PriorityTier=1) is
#   preempted by partition `urgent` (PriorityTier=2) with PreemptMode=REQUEUE and GraceTime
#   ($SIGSCALE_SLURM_GRACE_S, default 30 s): Slurm sends SIGCONT + SIGTERM, waits GraceTime, SIGKILLs,
#   and requeues the job. No PreemptParameters=send_user_signal: the training job must act on SIGTERM.
# - A cluster already running with an older slurm.conf is restarted with the new one (jobs survive).
set -euo pipefail

MODE="${2:-one-node}"
[[ "${1:-}" == *-node ]] && MODE="${3:-one-node}"  # kill-node NODE two-node
GRACE_S="${SIGSCALE_SLURM_GRACE_S:-30}"
if [[ "$MODE" == two-node ]]; then
    DIR="${SIGSCALE_SLURM_2N_DIR:-/tmp/sigscale-slurm-2n}"
    CLUSTER="${SIGSCALE_SLURM_2N_CLUSTER:-sigscale2n}"
    PORT_BASE="${SIGSCALE_SLURM_2N_PORT_BASE:-6827}"  # controller, slurmd, slurmdbd, MariaDB: 4 ports from here
    CTLD_PORT=$PORT_BASE SLURMD_PORT=$((PORT_BASE + 1)) DBD_PORT=$((PORT_BASE + 2)) DB_PORT=$((PORT_BASE + 3))
    NET="${SIGSCALE_SLURM_2N_NET:-10.213.0}"
    BRIDGE=sigscale-br0
    NODES=(node1 node2)
    CTLD_ADDR="$NET.1"
    FIRST_JOB_ID=100000  # job ids distinct from the one-node cluster's: submitit caches states by job id
elif [[ "$MODE" == one-node ]]; then
    DIR="${SIGSCALE_SLURM_DIR:-/tmp/sigscale-slurm}"
    CLUSTER="${SIGSCALE_SLURM_CLUSTER:-sigscale}"
    DB_PORT="${SIGSCALE_SLURM_DB_PORT:-3307}"
    CTLD_PORT="${SIGSCALE_SLURM_CTLD_PORT:-6817}"
    SLURMD_PORT="${SIGSCALE_SLURM_SLURMD_PORT:-6818}"
    DBD_PORT="${SIGSCALE_SLURM_DBD_PORT:-6819}"
    NODES=(localhost)
    CTLD_ADDR=127.0.0.1
    FIRST_JOB_ID=1
else
    echo "usage: $0 start|stop|status|env [two-node]; $0 kill-node|revive-node NODE two-node" >&2
    exit 64
fi
NODE=${NODES[0]}
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
    cat >"$DIR/etc/slurm.conf.new" <<EOF
ClusterName=$CLUSTER
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=localhost($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool$(suffix)
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd$(suffix).pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$(suffix).log
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
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
$(array_limit)
$(node_lines "$cpus")
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE_S
PartitionName=urgent Nodes=$(IFS=,; echo "${NODES[*]}") MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
    if cmp -s "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"; then
        rm "$DIR/etc/slurm.conf.new"
    else
        mv "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"
        CONFIG_CHANGED=1
    fi
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

suffix() {  # per-node daemon files when several slurmd share this config (Slurm expands %n)
    [[ "$MODE" == two-node ]] && echo "-%n" || true
}

node_addr() {  # node_addr INDEX (1-based): the node's address
    if [[ "$MODE" == two-node ]]; then echo "$NET.$((10 + $1))"; else echo 127.0.0.1; fi
}

array_limit() {  # the two-node cluster refuses arrays of more than 4 tasks, as sites cap MaxArraySize (default
    # 1001): tests/test_slurm_two_nodes.py checks that a longer step is submitted as several arrays
    [[ "$MODE" == two-node ]] && echo "MaxArraySize=4" || true
}

node_lines() {  # node_lines CPUS: one NodeName line per node; each node declares the machine's CPUs
    local i
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeAddr=$(node_addr $((i + 1))) CPUs=$1 State=UNKNOWN"
    done
}

netns_of() { echo "sigscale-$1"; }

net_up() {  # the bridge (controller's address) and one namespace per node, each with a veth on the bridge
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    # Not `ip ... | grep -q`: grep exits at the first match, and under pipefail ip's SIGPIPE fails the test.
    [[ "$(ip -4 addr show dev "$BRIDGE")" == *"inet $CTLD_ADDR/"* ]] || ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i node ns veth
    for i in "${!NODES[@]}"; do
        node=${NODES[$i]} ns=$(netns_of "${NODES[$i]}") veth="sigscale-v$((i + 1))"
        [[ -e "/run/netns/$ns" ]] || ip netns add "$ns"
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            ip -n "$ns" addr add "$(node_addr $((i + 1)))/24" dev eth0
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        # Bind-mounted over /etc/hosts in the node's namespaces: every node resolves every node
        # (MASTER_ADDR is a node name), and gloo finds its own address from its hostname.
        mkdir -p "/etc/netns/$ns"
        { echo "127.0.0.1 localhost"; echo "$CTLD_ADDR sigscale-ctl"
          for j in "${!NODES[@]}"; do echo "$(node_addr $((j + 1))) ${NODES[$j]}"; done; } >"/etc/netns/$ns/hosts"
    done
}

net_down() {
    local node ns
    for node in "${NODES[@]}"; do
        ns=$(netns_of "$node")
        if [[ -e "/run/netns/$ns" ]]; then
            ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
            ip netns del "$ns"
        fi
        rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null || true  # only when no other namespace keeps files there
    ! ip link show "$BRIDGE" >/dev/null 2>&1 || ip link del "$BRIDGE"
}

start_slurmd() {  # start_slurmd NODE: in the node's namespaces (two-node) or here
    local node=$1
    if [[ "$MODE" == two-node ]]; then
        alive "$DIR/run/slurmd-$node.pid" && return 0
        mkdir -p "$DIR/spool-$node"
        # Not `ip netns exec`: it remounts /sys, and slurmd then finds no /sys/fs/cgroup. Its own mount
        # namespace instead, for the node's /etc/hosts.
        nsenter --net="/run/netns/$(netns_of "$node")" -- unshare --mount --uts -- bash -c \
            'mount --bind "$3" /etc/hosts && hostname "$1" && exec /usr/sbin/slurmd -f "$2" -N "$1"' \
            slurmd "$node" "$SLURM_CONF" "/etc/netns/$(netns_of "$node")/hosts"
    else
        alive "$DIR/run/slurmd.pid" || /usr/sbin/slurmd -f "$SLURM_CONF" -N "$node"
    fi
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return 0
    munge -n >/dev/null 2>&1 && return 0  # a munged already serves this machine (another cluster's): share it
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
    if ((CONFIG_CHANGED)) && alive "$DIR/run/slurmctld.pid"; then
        # Partitions and PreemptType are read at start only; running and queued jobs survive the restart.
        log "slurm.conf changed: restarting slurmctld and slurmd"
        stop_slurmds
        stop_pidfile "$DIR/run/slurmctld.pid"
    fi
    [[ "$MODE" == two-node ]] && net_up
    alive "$DIR/run/slurmctld.pid" || /usr/sbin/slurmctld -f "$SLURM_CONF"
    wait_for 60 slurmctld scontrol ping
    local node
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    for node in "${NODES[@]}"; do wait_for 60 "node $node" node_usable "$node"; done
}

stop_slurmds() {
    local node
    for node in "${NODES[@]}"; do
        if [[ "$MODE" == two-node ]]; then stop_pidfile "$DIR/run/slurmd-$node.pid"; else stop_pidfile "$DIR/run/slurmd.pid"; fi
    done
}

node_usable() {  # node_usable NODE
    local state
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null) || return 1
    case "$state" in
        idle*|mixed*|allocated*|completing*) return 0 ;;
        down*|drain*|fail*)  # a node left down by an earlier unclean stop comes back on its own here
            scontrol update nodename="$1" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;
    esac
}

CONFIG_CHANGED=0

cmd_start() {
    if [[ $(id -u) -ne 0 ]] && cmd_status 2>/dev/null; then  # a non-root user reuses a running cluster as it is
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
    stop_slurmds
    stop_pidfile "$DIR/run/slurmctld.pid"
    stop_pidfile "$DIR/run/slurmdbd.pid"
    stop_pidfile "$DIR/run/mysqld.pid"
    stop_pidfile "$DIR/munge/munged.pid"
    [[ "$MODE" != two-node ]] || net_down
    log "stopped"
}

cmd_status() {
    # Ask the daemons themselves (works for any user): munge, slurmctld, slurmdbd (+ MariaDB behind it).
    munge -n >/dev/null 2>&1 || { log "munged does not answer"; return 1; }
    scontrol ping >/dev/null 2>&1 || { log "slurmctld does not answer (SLURM_CONF=$SLURM_CONF)"; return 1; }
    sacctmgr -n list cluster >/dev/null 2>&1 || { log "slurmdbd does not answer: no accounting"; return 1; }
    local state node
    for node in "${NODES[@]}"; do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null) || true
        [[ "$state" =~ ^(idle|mixed|allocated|completing) ]] || { log "node $node is not usable (state: ${state:-?})"; return 1; }
    done
    log "up: export SLURM_CONF=$SLURM_CONF"
}

cmd_kill_node() {  # a node that dies: its link goes first, so its peers get no FIN/RST, only silence
    local node=$1 ns
    [[ "$MODE" == two-node ]] && [[ " ${NODES[*]} " == *" $node "* ]] \
        || { log "kill-node needs a node of the two-node cluster (${NODES[*]}), got '$node'"; exit 64; }
    ns=$(netns_of "$node")
    ip -n "$ns" link set eth0 down
    ip netns pids "$ns" | xargs -r kill -9
    rm -f "$DIR/run/slurmd-$node.pid"
    log "killed $node: link down, every process in $ns killed"
}

cmd_revive_node() {
    local node=$1
    [[ "$MODE" == two-node ]] || { log "revive-node needs two-node"; exit 64; }
    ip -n "$(netns_of "$node")" link set eth0 up
    start_slurmd "$node"
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    wait_for 60 "node $node" node_usable "$node"
    log "revived $node"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    kill-node) cmd_kill_node "${2:?node}" ;;
    revive-node) cmd_revive_node "${2:?node}" ;;
    *) echo "usage: $0 start|stop|status|env [two-node]; $0 kill-node|revive-node NODE two-node" >&2; exit 64 ;;
esac
