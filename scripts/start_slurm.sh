#!/usr/bin/env bash
# Start a throw-away single-node Slurm (slurmctld + slurmd on 127.0.0.1) for tests, without systemd.
#
#   scripts/start_slurm.sh [DIR]        DIR: private state folder (default /tmp/cubefit-slurm)
#
# Everything of this cluster lives in DIR: slurm.conf, state, spool, logs and the pid file of
# each daemon this script started (DIR/pids/*.pid; scripts/stop_slurm.sh DIR stops exactly
# those).  /etc/slurm is not touched.  Clients find the cluster with  export SLURM_CONF=DIR/slurm.conf
# (printed as the last line).  Needs root; installs Debian's slurm-wlm and munge when missing,
# starts munged only when none answers (then stop_slurm.sh stops it too), and adds
# "127.0.0.1 $(hostname -s)" to /etc/hosts when the host name does not resolve.
#
# The node declares SLURM_TEST_CPUS CPUs (default 8, oversubscribing small machines) so that
# 4-task jobs run on a 2-core box.  Ports: SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT
# (default 6817 / 6818).
#
# Exit codes: 0 ready; 3 cannot run here (not root, or the packages cannot be installed);
# 1 a daemon did not come up (see DIR/log/).
set -euo pipefail

DIR=$(realpath -m "${1:-/tmp/cubefit-slurm}")
CPUS=${SLURM_TEST_CPUS:-8}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}

say() { printf '[%s] start_slurm: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cannot() { say "CANNOT RUN: $*"; exit 3; }
fail() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || cannot "needs root (slurmd and munged run as system daemons)"

# ---- 1. packages --------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
if ! installed slurm-wlm || ! installed munge; then
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge missing and no apt-get"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || cannot "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 \
        || cannot "apt-get install slurm-wlm munge failed"
fi
for exe in slurmctld slurmd sbatch srun sinfo munged munge; do
    command -v "$exe" >/dev/null || cannot "$exe not found after installing slurm-wlm and munge"
done

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
for d in slurmctld slurmd; do
    alive "$DIR/pids/$d.pid" && fail "$d of $DIR is already running (scripts/stop_slurm.sh $DIR first)"
done
if ss -ltn 2>/dev/null | grep -qE "[:.]($CTLD_PORT|$SLURMD_PORT)\b"; then
    fail "port $CTLD_PORT or $SLURMD_PORT is in use (another Slurm?); set SLURM_TEST_CTLD_PORT/SLURM_TEST_SLURMD_PORT"
fi

# ---- 2. configuration ---------------------------------------------------------------------
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
rm -rf "$DIR/state" "$DIR/spool"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/pids"
cat > "$DIR/slurm.conf" <<CONF
# written by scripts/start_slurm.sh: a single-node test cluster, not for production
ClusterName=cubefit-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
# keep finished jobs a few seconds only: sbatch --wait then polls every 2 s instead of backing off
MinJobAge=4
KillWait=5
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/pids/slurmctld.pid
SlurmdPidFile=${DIR}/pids/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$DIR/slurm.conf

# ---- 3. munge (shared with the system: started only when none answers) --------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { command -v mungekey >/dev/null && mungekey --create >&2; } \
        || fail "no /etc/munge/munge.key and no mungekey to make one"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/pids/munged.pid"      # ours: stop_slurm.sh stops it
    munge -n | unmunge >/dev/null || fail "munged does not answer"
fi

# ---- 4. the Slurm daemons (both daemonize and write their pid files) ----------------------
say "starting slurmctld and slurmd ($CPUS CPUs declared on $HOST, config $SLURM_CONF)"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start (see $DIR/log/slurmd.log)"
for _ in $(seq 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        say "ready: $(sinfo -h -o '%P %a %D %t %c' | head -1)"
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
fail "the node did not become idle within 30 s"
