#!/usr/bin/env bash
# Bring up what Switchyard needs: NATS with JetStream and PostgreSQL.
#   1. reuse ones already answering on NATS_URL / DATABASE_URL (default loopback ports);
#   2. else `docker compose up -d nats postgres` when a Docker engine answers;
#   3. else start local servers from the distribution's packages, installing them if missing.
# Idempotent: safe to run again. Sourced or executed.
set -euo pipefail

NATS_HOST=127.0.0.1; NATS_PORT=4222
PG_HOST=127.0.0.1; PG_PORT=5432
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "[services] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  local host=$1 port=$2 name=$3
  for _ in $(seq 1 60); do
    port_open "$host" "$port" && return 0
    sleep 1
  done
  log "$name did not come up on $host:$port"; return 1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || { log "no apt-get: install $* yourself"; return 1; }
  log "installing $* from the distribution's packages"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

need_nats=1; need_pg=1
port_open $NATS_HOST $NATS_PORT && { log "reusing NATS on $NATS_HOST:$NATS_PORT"; need_nats=0; }
port_open $PG_HOST $PG_PORT && { log "reusing PostgreSQL on $PG_HOST:$PG_PORT"; need_pg=0; }
[ $need_nats = 0 ] && [ $need_pg = 0 ] && exit 0

if docker_ok; then
  svcs=()
  [ $need_nats = 1 ] && svcs+=(nats)
  [ $need_pg = 1 ] && svcs+=(postgres)
  log "starting ${svcs[*]} with docker compose"
  (cd "$here" && docker compose up -d "${svcs[@]}")
  [ $need_nats = 1 ] && wait_port $NATS_HOST $NATS_PORT NATS
  [ $need_pg = 1 ] && wait_port $PG_HOST $PG_PORT PostgreSQL
  exit 0
fi

if [ $need_nats = 1 ]; then
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  store=/var/lib/nats-server; logf=/var/log/nats-server.log
  if ! as_root mkdir -p "$store" 2>/dev/null; then store="$here/target/nats-data"; logf="$here/target/nats-server.log"; mkdir -p "$store"; fi
  log "starting local nats-server with JetStream"
  if command -v start-stop-daemon >/dev/null && [ "$(id -u)" = 0 ]; then
    start-stop-daemon --start --oknodo --background --exec "$bin" -- \
      -a $NATS_HOST -p $NATS_PORT -js -sd "$store" -l "$logf"
  else
    nohup "$bin" -a $NATS_HOST -p $NATS_PORT -js -sd "$store" -l "$logf" >/dev/null 2>&1 &
  fi
  wait_port $NATS_HOST $NATS_PORT NATS
fi

if [ $need_pg = 1 ]; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  log "starting local PostgreSQL $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || as_root pg_ctlcluster "$ver" main start || true
  wait_port $PG_HOST $PG_PORT PostgreSQL
  # The default URL has no password: allow trust auth on loopback (development machines only).
  if ! psql "postgres://postgres@$PG_HOST:$PG_PORT/postgres" -Atc 'select 1' >/dev/null 2>&1; then
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    log "enabling trust authentication for 127.0.0.1 in $hba"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload 2>/dev/null || as_root pg_ctlcluster "$ver" main reload
  fi
fi
