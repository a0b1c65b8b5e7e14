#!/usr/bin/env bash
# Stop the test cluster that scripts/start_slurm.sh DIR started: cancel its jobs, then stop
# exactly the daemons whose pid files it wrote (DIR/pids/*.pid), by pid, TERM then KILL.
#
#   scripts/stop_slurm.sh [DIR]        (default /tmp/cubefit-slurm)
#
# Safe to run twice or when nothing was started.  Exit code 0 unless a daemon survives KILL.
set -uo pipefail

DIR=$(realpath -m "${1:-/tmp/cubefit-slurm}")
say() { printf '[%s] stop_slurm: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# the pid file must name a live process running the expected program (pids get reused)
live_pid() {
    local file=$1 name=$2 pid
    [ -f "$file" ] || return 1
    pid=$(cat "$file" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    echo "$pid"
}

if [ -f "$DIR/slurm.conf" ] && live_pid "$DIR/pids/slurmctld.pid" slurmctld >/dev/null; then
    export SLURM_CONF=$DIR/slurm.conf
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        for _ in $(seq 20); do
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

status=0
for name in slurmd slurmctld munged; do
    pid=$(live_pid "$DIR/pids/$name.pid" "$name") || { rm -f "$DIR/pids/$name.pid"; continue; }
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored TERM: KILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
        kill -0 "$pid" 2>/dev/null && { say "ERROR: $name (pid $pid) still alive"; status=1; }
    fi
    rm -f "$DIR/pids/$name.pid"
done
exit $status
