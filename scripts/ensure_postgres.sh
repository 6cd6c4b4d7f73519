#!/usr/bin/env bash
# The audit tests start a throw-away PostgreSQL server (initdb + pg_ctl on a loopback port in a
# temp folder). Use the server binaries that are installed; else install PostgreSQL with
# apt-get when we may; else say how and stop. Prints the bin folder on success.
set -u
find_bin() {
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")"; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then echo "$dir"; return 0; fi
  done
  return 1
}
if find_bin; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "ensure_postgres: no PostgreSQL server found; installing postgresql with apt-get" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }; } \
    && find_bin && exit 0
fi
cat >&2 <<'MSG'
ensure_postgres: the PostgreSQL audit tests need a PostgreSQL server (initdb, pg_ctl), none was found.
  Debian/Ubuntu:  sudo apt-get install postgresql
  Fedora/RHEL:    sudo dnf install postgresql-server
  macOS:          brew install postgresql
MSG
exit 1
