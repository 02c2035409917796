#!/usr/bin/env bash
# A throwaway SLURM cluster on this machine, for the tests and for trying submission before the real
# cluster: munged, MariaDB + slurmdbd (accounting: submitit polls sacct), slurmctld and one slurmd
# per simulated node. Installs Debian's packages when they are missing (needs root and apt).
# Keys, state, logs and the database live under $SLURM_BASE; nothing in /etc is touched.
#
#   SLURM_BASE=/tmp/psa-slurm NODES="n1 n2" bash launch/slurm_up.sh && source /tmp/psa-slurm/env.sh
#   sinfo; sbatch ...; bash launch/slurm_down.sh      # stops exactly what this script started
#
# NODES unset: one node named after this host. NODES="n1 n2": several slurmd on this host
# (slurmd -N), each with all CPUs. Their names do not resolve, so env.sh exports
# PSA_MASTER_ADDR=127.0.0.1 for psa-dist's DDP rendezvous.
set -euo pipefail
B=${SLURM_BASE:-/tmp/psa-slurm}
PORT=${SLURM_PORT_BASE:-6817}      # slurmctld PORT, slurmdbd PORT+2, mariadb PORT+3, slurmd PORT+10+i
H=$(hostname -s)
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
MEM=${SLURM_NODE_MEM_MB:-8000}

need=()
for bin in munged slurmctld slurmd sbatch slurmdbd mariadbd; do command -v "$bin" >/dev/null || need+=("$bin"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "[slurm] installing slurm-wlm, munge, slurmdbd, mariadb-server (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd \
    mariadb-server >/dev/null
fi

if [ -f "$B/run/slurmctld.bgpid" ] && kill -0 "$(cat "$B/run/slurmctld.bgpid")" 2>/dev/null; then
  echo "[slurm] already running under $B"; exit 0
fi
mkdir -p "$B"/{munge,ctld,spool,log,run,mysql}
chmod 755 "$B" "$B/munge"            # munged refuses a socket path not world-executable

# munge: a key and a socket of this cluster's own
[ -s "$B/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$B/munge/munge.key"; chmod 400 "$B/munge/munge.key"; }
SOCK=$B/munge/munge.socket.2
/usr/sbin/munged -F --socket="$SOCK" --key-file="$B/munge/munge.key" --log-file="$B/log/munged.log" \
  --pid-file="$B/run/munged.pid" --seed-file="$B/munge/munged.seed" >"$B/log/munged.out" 2>&1 &
echo $! > "$B/run/munged.bgpid"
for _ in $(seq 50); do munge -S "$SOCK" -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
if ! munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK" >/dev/null 2>&1; then
  echo "[slurm] munged did not start (every directory above $B must be world-executable):" >&2
  cat "$B/log/munged.log" "$B/log/munged.out" >&2 2>/dev/null; exit 1
fi

# accounting database
MYPORT=$((PORT + 3))
[ -d "$B/mysql/data/mysql" ] || mariadb-install-db --no-defaults --user=root --datadir="$B/mysql/data" \
  --auth-root-authentication-method=normal --skip-test-db >"$B/log/mariadb-install.log" 2>&1
mariadbd --no-defaults --user=root --datadir="$B/mysql/data" --socket="$B/mysql/mysqld.sock" \
  --pid-file="$B/mysql/mysqld.pid" --bind-address=127.0.0.1 --port=$MYPORT \
  --innodb-buffer-pool-size=64M --log-error="$B/log/mariadb.err" >/dev/null 2>&1 &
echo $! > "$B/run/mariadbd.bgpid"
for _ in $(seq 150); do mariadb-admin --socket="$B/mysql/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.2; done
mariadb --socket="$B/mysql/mysqld.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' \
  IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

cat > "$B/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=$H
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$B/log/slurmdbd.log
PidFile=$B/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYPORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$B/slurmdbd.conf"         # slurmdbd refuses a readable config

if [ -z "${NODES:-}" ]; then NODES_LIST=$H; else NODES_LIST=$NODES; fi
NODELINES=""; i=0
for n in $NODES_LIST; do
  i=$((i + 1))
  NODELINES+="NodeName=$n NodeHostname=$H NodeAddr=127.0.0.1 Port=$((PORT + 10 + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
done
cat > "$B/slurm.conf" <<EOF
ClusterName=psa
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$B/ctld
SlurmdSpoolDir=$B/spool/%n
SlurmctldPidFile=$B/run/slurmctld.pid
SlurmdPidFile=$B/run/slurmd-%n.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd-%n.log
# no cgroups in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
# the slurmctld -> slurmdbd link authenticates through this munge socket
AccountingStoragePass=$SOCK
JobCompType=jobcomp/none
$NODELINES
PartitionName=debug Nodes=$(echo $NODES_LIST | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$B/slurm.conf

slurmdbd -D >"$B/log/slurmdbd.out" 2>&1 &          # reads slurmdbd.conf beside $SLURM_CONF
echo $! > "$B/run/slurmdbd.bgpid"
for _ in $(seq 150); do grep -q "slurmdbd version .* started" "$B/log/slurmdbd.log" 2>/dev/null && break; sleep 0.1; done
slurmctld -D -i >"$B/log/slurmctld.out" 2>&1 &
echo $! > "$B/run/slurmctld.bgpid"
for n in $NODES_LIST; do
  mkdir -p "$B/spool/$n"
  slurmd -D -N "$n" >"$B/log/slurmd-$n.out" 2>&1 &
  echo $! > "$B/run/slurmd-$n.bgpid"
done
want=$(echo $NODES_LIST | wc -w)
for _ in $(seq 200); do
  [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -ge "$want" ] && break; sleep 0.25
done
if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -lt "$want" ]; then
  echo "[slurm] nodes did not come up; logs in $B/log" >&2; sinfo -N >&2 || true; exit 1
fi
{
  echo "export SLURM_CONF=$B/slurm.conf"
  [ -n "${NODES:-}" ] && echo "export PSA_MASTER_ADDR=127.0.0.1"
} > "$B/env.sh"
sinfo -N
echo "[slurm] up: source $B/env.sh"
