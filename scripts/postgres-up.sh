#!/usr/bin/env bash
# Start a local PostgreSQL for the tests and print the DSN of a fresh test database.
# Installs the server with apt where it is missing. Needs root (CI and the dev machines
# run as root); prints nothing but the DSN on stdout.
set -euo pipefail
ROLE=drip_test
PASSWORD=drip_test
DB=drip_test
log() { echo "postgres-up: $*" >&2; }

if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  log "installing postgresql with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi

if [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  log "creating cluster $VERSION/main"
  pg_createcluster "$VERSION" main >&2
fi
read -r VERSION CLUSTER PORT STATUS _ < <(pg_lsclusters -h | head -n 1)
if [ "$STATUS" != "online" ]; then
  log "starting cluster $VERSION/$CLUSTER"
  pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || { log "server did not become ready"; exit 1; }

as_pg() { (cd / && su postgres -c "psql -v ON_ERROR_STOP=1 -qtA -p $PORT $*") ; }
if [ "$(as_pg "-c \"SELECT 1 FROM pg_roles WHERE rolname='$ROLE'\"")" != "1" ]; then
  as_pg "-c \"CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD' CREATEDB\"" >&2
fi
if [ "$(as_pg "-c \"SELECT 1 FROM pg_database WHERE datname='$DB'\"")" != "1" ]; then
  as_pg "-c \"CREATE DATABASE $DB OWNER $ROLE\"" >&2
fi
as_pg "-c \"ALTER DATABASE $DB OWNER TO $ROLE\"" >&2
echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
