#!/usr/bin/env bash
# A whole local mesh to try: a coordinator, two sites (site-a consumes,
# site-b exports a web server as "web"), all on this machine, no root.
# Ctrl-C stops everything. MESHLINK_DEMO_ONESHOT=1 checks it works and exits.
#
# Ports (environment): COORD_PORT (8443), WEB_PORT (8000), METRICS_PORT
# (9090), and site-a's DNS_PORT (5353), SOCKS_PORT (1080) and
# HTTP_PROXY_PORT (3128). Those three, when not given, move to the next
# free port if taken (mDNS often holds 5353), and the demo prints them.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-bin/meshlink}
HELLO=${HELLO:-bin/hello}
DIR=${DEMO_DIR:-demo}
COORD_PORT=${COORD_PORT:-8443}
WEB_PORT=${WEB_PORT:-8000}
METRICS_PORT=${METRICS_PORT:-9090}

# busy PORT: something listens on TCP or UDP PORT (ss from iproute2; without
# it only TCP can be checked).
busy() {
  if command -v ss >/dev/null 2>&1; then
    [[ -n $(ss -Hlntu "sport = :$1" 2>/dev/null) ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
# free_port PORT: PORT, or the first free one of the next 100.
free_port() {
  local p=$1
  while busy "$p"; do
    p=$((p + 1))
    ((p < $1 + 100)) || { echo "demo: no free port in $1-$p; set it in the environment" >&2; exit 1; }
  done
  echo "$p"
}
DNS_PORT=${DNS_PORT:-$(free_port 5353)}
SOCKS_PORT=${SOCKS_PORT:-$(free_port 1080)}
HTTP_PROXY_PORT=${HTTP_PROXY_PORT:-$(free_port 3128)}

[[ -x $BIN && -x $HELLO ]] || { echo "build first: make build"; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      echo "demo: timed out waiting for $what; logs are in $DIR/*.log" >&2
      tail -n 20 "$DIR"/*.log >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

echo "==> coordinator on https://127.0.0.1:$COORD_PORT (data in $DIR/coord)"
"$BIN" coordinator --listen "127.0.0.1:$COORD_PORT" --data "$DIR/coord" --allow-loopback-endpoints \
  --metrics-listen "127.0.0.1:$METRICS_PORT" >"$DIR/coord.log" 2>&1 &
pids+=($!)
wait_for 20 "the coordinator" "$BIN" token create --data "$DIR/coord"
TOKEN=$("$BIN" token create --data "$DIR/coord" --reusable --expires 1h)
echo "==> join token: ${TOKEN:0:24}…"

echo "==> sample web server at site-b on 127.0.0.1:$WEB_PORT"
"$HELLO" --listen "127.0.0.1:$WEB_PORT" --site site-b >"$DIR/hello.log" 2>&1 &
pids+=($!)

echo "==> site-b exports it as 'web'"
"$BIN" agent --join "$TOKEN" --name site-b --state "$DIR/b" --dns off \
  --proxy-range "${PROXY_RANGE_B:-127.102.0.0/16}" --expose "web=127.0.0.1:$WEB_PORT" >"$DIR/site-b.log" 2>&1 &
pids+=($!)

echo "==> site-a consumes: DNS on 127.0.0.1:$DNS_PORT (DNS_PORT), SOCKS5 on 127.0.0.1:$SOCKS_PORT, HTTP proxy on 127.0.0.1:$HTTP_PROXY_PORT"
"$BIN" agent --join "$TOKEN" --name site-a --state "$DIR/a" --dns "127.0.0.1:$DNS_PORT" \
  --socks5 "127.0.0.1:$SOCKS_PORT" --http-proxy "127.0.0.1:$HTTP_PROXY_PORT" \
  --proxy-range "${PROXY_RANGE_A:-127.100.0.0/16}" >"$DIR/site-a.log" 2>&1 &
pids+=($!)

wait_for 30 "web to reach site-a" bash -c "'$BIN' services --state '$DIR/a' --json | grep -q '\"listening\": true'"

echo
"$BIN" services --state "$DIR/a"
echo
IP=$(bash -c "'$BIN' services --state '$DIR/a' --json" | sed -n 's/.*"local": "\([0-9.]*\):.*/\1/p' | head -n1)
if command -v dig >/dev/null; then
  echo "\$ dig +short @127.0.0.1 -p $DNS_PORT web.mesh.internal"
  dig +short @127.0.0.1 -p "$DNS_PORT" web.mesh.internal
fi
echo "\$ curl http://$IP:$WEB_PORT/"
curl -sS --max-time 10 "http://$IP:$WEB_PORT/"
echo
echo "\$ curl --socks5-hostname 127.0.0.1:$SOCKS_PORT http://web.mesh.internal:$WEB_PORT/"
curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$SOCKS_PORT" "http://web.mesh.internal:$WEB_PORT/"
echo
"$BIN" status --state "$DIR/a"

if [[ ${MESHLINK_DEMO_ONESHOT:-} == 1 ]]; then
  exit 0
fi
cat <<TXT

The mesh is up. Try, in another terminal:
  dig @127.0.0.1 -p $DNS_PORT web.mesh.internal
  curl http://$IP:$WEB_PORT/
  curl --socks5-hostname 127.0.0.1:$SOCKS_PORT http://web.mesh.internal:$WEB_PORT/   # no DNS setup needed
  curl -x http://127.0.0.1:$HTTP_PROXY_PORT http://web.mesh.internal:$WEB_PORT/
  $BIN status --state $DIR/a
  $BIN services --state $DIR/a
  $BIN ping site-b --state $DIR/a
  $BIN dns install --state $DIR/a --dry-run   # what `sudo meshlink dns install` would set up: mesh names for every program
  curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep ^meshlink_
  open https://127.0.0.1:$COORD_PORT/ (console: user admin, one-time password in $DIR/coord/admin-password.txt)
  $BIN expose ssh 127.0.0.1:22 --state $DIR/b     # then: $BIN services --state $DIR/a
Logs: $DIR/*.log. Ctrl-C stops the demo.
TXT
wait
