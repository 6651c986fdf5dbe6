#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for tests/distributed/test_slurm.py (`make test-slurm`):
#
#   sudo tests/slurm/cluster.sh up     # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd n1, n2
#   sudo tests/slurm/cluster.sh down   # stop the daemons this script started
#
# Debian's slurm-wlm (22.05) and munge. The two nodes n1 and n2 are two slurmd daemons (`slurmd -N`)
# on loopback ports 17001 and 17002; n1 and n2 resolve to 127.0.0.1 through /etc/hosts. Root is
# needed (packages, /etc, daemons). It exits non-zero with one line when the cluster cannot start.
set -euo pipefail

STATE=${DLTRAIN_SLURM_STATE:-/var/lib/dltrain-test-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
CTLD_PORT=${DLTRAIN_SLURMCTLD_PORT:-16817}

die() { echo "cluster.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons): sudo $0 ${1:-up}"

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } \
        || die "could not install slurm-wlm and munge with apt-get"
}

write_conf() {
    mkdir -p /etc/slurm "$STATE/ctld" /var/spool/slurmd/n1 /var/spool/slurmd/n2
    cat > "$CONF" <<CONF
# written by dltrain tests/slurm/cluster.sh: two nodes, n1 and n2, on this host
ClusterName=dltraintest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
SelectType=select/cons_tres
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SchedulerParameters=sched_interval=1
# a preempted or cancelled step has this long to write its checkpoint before SIGKILL
KillWait=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=1 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
    grep -qE '^[^#]*[[:space:]]n1([[:space:]]|$)' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
}

start_munge() {
    pgrep -x munged >/dev/null && return
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start"
}

up() {
    install_packages
    down quiet
    write_conf
    start_munge
    slurmctld || die "slurmctld did not start (see $STATE/slurmctld.log)"
    slurmd -N n1 || die "slurmd -N n1 did not start (see $STATE/slurmd-n1.log)"
    slurmd -N n2 || die "slurmd -N n2 did not start (see $STATE/slurmd-n2.log)"
    for _ in $(seq 60); do
        [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 2 ] && { sinfo -N; return; }
        sleep 1
    done
    sinfo -N >&2 || true
    die "n1 and n2 are not idle after 60 s (see $STATE/*.log)"
}

stop_pidfile() {  # the daemon of one pid file, if it runs: SIGTERM, up to 10 s for it to end, then SIGKILL
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    # Jobs a test left (it failed, or was interrupted) are cancelled first: their steps end within
    # KillWait (30 s) while the daemons still run, instead of outliving them.
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        scancel --partition=test 2>/dev/null || true
        for _ in $(seq 45); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
    fi
    stop_pidfile "$STATE/slurmd-n1.pid"
    stop_pidfile "$STATE/slurmd-n2.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    rm -rf "$STATE/ctld"  # no jobs carried into the next cluster
    [ "${1:-}" = quiet ] || echo "cluster.sh: slurmctld and slurmd n1, n2 stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) die "usage: $0 up|down" ;;
esac
