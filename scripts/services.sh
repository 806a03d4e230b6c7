#!/usr/bin/env bash
# Start the local Redis (6379) and PostgreSQL (5432) that the feature store profiles and their
# tests use (docs/stores.md), unless they already accept connections. Idempotent; says what it did.
# Also creates the default registry database ($PROPENSITY_PG_DATABASE, default "propensity").
set -euo pipefail

REDIS_HOST=127.0.0.1 REDIS_PORT=6379
PG_HOST=127.0.0.1 PG_PORT=5432 PG_USER=postgres
PG_DATABASE="${PROPENSITY_PG_DATABASE:-propensity}"
WAIT_SECONDS=30

redis_up() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

need() {
    command -v "$1" >/dev/null || { echo "services: $1 not found; install $2" >&2; exit 1; }
}

wait_for() {  # name, check function
    for _ in $(seq "$((WAIT_SECONDS * 5))"); do
        "$2" && return 0
        sleep 0.2
    done
    echo "services: $1 did not accept connections within ${WAIT_SECONDS}s" >&2
    exit 1
}

if redis_up; then
    echo "services: Redis already running on $REDIS_HOST:$REDIS_PORT"
else
    need redis-server redis-server
    need redis-cli redis-tools
    echo "services: starting Redis on $REDIS_HOST:$REDIS_PORT"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis_up
    echo "services: Redis is up"
fi

if pg_up; then
    echo "services: PostgreSQL already running on $PG_HOST:$PG_PORT"
else
    need pg_ctlcluster postgresql
    need pg_isready postgresql-client
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    echo "services: starting PostgreSQL $version (cluster main) on $PG_HOST:$PG_PORT"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for PostgreSQL pg_up
    echo "services: PostgreSQL is up"
fi

if [ "$(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" = 1 ]; then
    echo "services: registry database $PG_DATABASE exists"
else
    createdb -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" "$PG_DATABASE"
    echo "services: created registry database $PG_DATABASE"
fi
