#!/usr/bin/env bash
# Schemathesis with every check, against `serve` on a scratch database: the OpenAPI document
# must list every status each operation answers, with its body. Fixed seed and time budget.
set -euo pipefail
db="cmw_schemathesis_$$"
port=8765
createdb -h 127.0.0.1 -U postgres "$db"
spool="$(mktemp -d)"
export DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$db" FERNET_KEYS="$(coldmail-webhooks generate-key)"
export WEBHOOK_TOKENS=st-webhook-token-0001 OPS_API_TOKENS=st-ops-token-00001
export CREDENTIALS_API_TOKENS=st-credentials-token-1
export LOG_LEVEL=WARNING SPOOL_DIR="$spool"
coldmail-webhooks serve --port "$port" > "$spool/serve.log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; dropdb -h 127.0.0.1 -U postgres --if-exists "$db"; rm -rf "$spool"; }
trap cleanup EXIT
for _ in $(seq 60); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 1; done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { tail -5 "$spool/serve.log"; exit 1; }
config="$(cd "$(dirname "$0")" && pwd)/schemathesis.toml"
cd "$spool"  # schemathesis keeps a cache in the working folder: not in the checkout
st --config-file "$config" run "http://127.0.0.1:$port/openapi.json" --checks all -H "Authorization: Bearer st-credentials-token-1" \
  --max-time "${SCHEMATHESIS_SECONDS:-120}" --seed 20261123 --no-color
