#!/usr/bin/env bash
# Stop what launch/slurm_up.sh started, by the PIDs it recorded (never by name): cancel jobs, then
# the SLURM daemons, then MariaDB and munged. SLURM_BASE as for slurm_up.sh; PURGE=1 also deletes it.
B=${SLURM_BASE:-/tmp/psa-slurm}
if [ -f "$B/slurm.conf" ]; then
  SLURM_CONF=$B/slurm.conf timeout 10 scancel --user="$(id -un)" 2>/dev/null && sleep 1
fi
stop() {  # SIGTERM every recorded pid, wait up to 20 s, SIGKILL what is left
  local f p pids=()
  for f in "$@"; do
    [ -f "$f" ] || continue
    p=$(cat "$f"); rm -f "$f"
    kill "$p" 2>/dev/null && pids+=("$p")
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  for _ in $(seq 200); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && { echo "[slurm] pid $p ignored SIGTERM: SIGKILL"; kill -9 "$p"; }; done
  return 0
}
shopt -s nullglob
stop "$B"/run/slurmd-*.bgpid "$B/run/slurmctld.bgpid" "$B/run/slurmdbd.bgpid"
stop "$B/run/mariadbd.bgpid" "$B/run/munged.bgpid"
[ "${PURGE:-0}" = 1 ] && rm -rf "$B"
exit 0
