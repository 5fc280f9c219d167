#!/usr/bin/env bash
# PostgreSQL for the shared-state tests (replicas, and the SQL tests' PostgreSQL runs):
# installs Debian's server package when it is missing, starts the newest cluster, and
# makes the role the tests log in as (ENCLAVE_TEST_POSTGRES_URL's default). Needs root.
set -euo pipefail

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
clusters=$(pg_lsclusters -h 2>/dev/null || true)
if ! awk '{print $1, $2}' <<<"$clusters" | grep -qx "$version main"; then
    pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start 2>/dev/null || pg_ctlcluster "$version" main status >/dev/null

for _ in $(seq 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 1
done
role=$(su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'enclave'\"")
[ "$role" = 1 ] || su postgres -c "psql -qc \"CREATE ROLE enclave LOGIN CREATEDB PASSWORD 'enclave'\""
# The tests drop their databases WITH (FORCE): an autovacuum worker busy in one (after a
# test deleted many rows) may only be terminated by a member of pg_signal_backend.
su postgres -c "psql -qc \"GRANT pg_signal_backend TO enclave\"" 2>/dev/null || echo "warning: pg_signal_backend not granted to enclave" >&2
echo "PostgreSQL $version is up on 127.0.0.1:5432 (role enclave)"
