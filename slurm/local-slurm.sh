#!/usr/bin/env bash
# A one-node Slurm on this machine, for the Slurm test (tests/test_slurm.py, make test-cluster) and for trying
# the sbatch scripts: Debian's slurm-wlm (slurmctld + slurmd) and munge, installed with apt when missing.
#   sudo bash slurm/local-slurm.sh start     install if needed, write the config, start the daemons, wait idle
#   sudo bash slurm/local-slurm.sh stop      stop them (the test does both)
# Root is needed (apt, the daemons). The config lives in $KIT_SLURM_DIR (default /tmp/kit-slurm), so an
# existing /etc/slurm is left alone.
set -euo pipefail
dir=${KIT_SLURM_DIR:-/tmp/kit-slurm}
conf=$dir/slurm.conf
export SLURM_CONF=$conf

stop() {
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

start() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    fi
    stop
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge" /run/munge
    node=$(hostname -s)
    cpus=$(nproc)
    cat > "$conf" <<CONF
ClusterName=kit
SlurmctldHost=$node
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${KIT_SLURMCTLD_PORT:-6817}
SlurmdPort=${KIT_SLURMD_PORT:-6818}
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=kit Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                     chmod 400 /etc/munge/munge.key; }
    chown -R root:root /etc/munge /run/munge "$dir/munge" 2>/dev/null || true
    munged --force --socket=/run/munge/munge.socket.2 --pid-file="$dir/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 300); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
        [ "$state" = "idle" ] && { echo "slurm: $node idle ($cpus CPUs), SLURM_CONF=$conf"; return 0; }
        sleep 0.2
    done
    echo "error: the local Slurm did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    stop
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: bash slurm/local-slurm.sh start|stop" >&2; exit 2 ;;
esac
