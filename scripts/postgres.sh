#!/usr/bin/env bash
# A real PostgreSQL server on loopback for tests, from Debian's packages.
#   scripts/postgres.sh start DIR [--watch-pid PID]   last stdout line: postgres://postgres@127.0.0.1:PORT/postgres
#   scripts/postgres.sh stop DIR
set -euo pipefail

pgbin() {
  local b
  b="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -z "$b" ] || [ ! -x "$b/initdb" ]; then
    echo "installing postgresql from Debian's packages" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    b="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  fi
  echo "$b"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n 2,4p "$0" >&2; exit 2; }
case "$cmd" in
  start)
    watch=""
    if [ "${3:-}" = "--watch-pid" ]; then watch="${4:?--watch-pid needs a pid}"; fi
    bin="$(pgbin)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$dir"
      # The server runs as postgres: it must be able to reach DIR (mktemp folders are 0700).
      p="$(dirname "$dir")"
      while [ "$p" != "/" ]; do chmod o+x "$p" 2>/dev/null || true; p="$(dirname "$p")"; done
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
      -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c fsync=off" start >&2 \
      || { tail -n 30 "$dir/postgres.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    if [ -n "$watch" ]; then
      setsid bash -c "while kill -0 $watch 2>/dev/null; do sleep 1; done; runuser -u postgres -- '$bin/pg_ctl' -D '$dir/data' -m fast stop >/dev/null 2>&1 || '$bin/pg_ctl' -D '$dir/data' -m fast stop >/dev/null 2>&1" \
        </dev/null >/dev/null 2>&1 &
    fi
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    bin="$(pgbin)"
    [ -f "$dir/data/PG_VERSION" ] || exit 0
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    ;;
  *) sed -n 2,4p "$0" >&2; exit 2 ;;
esac
