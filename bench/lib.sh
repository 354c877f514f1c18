# Shared by bench/run.sh and bench/profile.sh (sourced, not run): tools, build, the work
# folder with its cleanup, nginx as the one origin, and hub + agent as separate processes of the
# real binary. Expects ROOT, SMOKE and RATHOLE to be set; BENCH_WRAP_HUB / BENCH_WRAP_AGENT may
# name a command (e.g. valgrind) to run that process under, BENCH_CONNECT another `connect`.

say() { echo "bench: $*" >&2; }
die() {
    say "$*"
    local log
    for log in "${WORK:-/nonexistent}"/{hub,agent,rathole,nginx-error}.log; do
        [ -s "$log" ] && { say "--- last lines of $(basename "$log")"; tail -n 20 "$log" >&2; }
    done
    exit 1
}

# --- tools -------------------------------------------------------------------------------
need_apt=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
    say "installing ${need_apt[*]} (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
TOOLS="$ROOT/bench/.tools"
RATHOLE_BIN="$TOOLS/bin/rathole"
if [ "$RATHOLE" = 1 ] && [ ! -x "$RATHOLE_BIN" ]; then
    say "installing rathole into $TOOLS (cargo install; a few minutes)"
    # rathole 0.5.0's lock file pins `time` 0.3.29, which current compilers reject, so it is
    # built against current compatible versions (no --locked). Noise only: no OpenSSL needed.
    cargo install rathole --version 0.5.0 --no-default-features \
        --features server,client,noise --root "$TOOLS" >&2
fi

# --- build -------------------------------------------------------------------------------
cd "$ROOT"
# Two commands: built together, the binary would get the example's dev-dependency features
# (tokio's test-util) and would not be the binary that is shipped.
if [ "$SMOKE" = 1 ]; then
    PROFILE_DIR=debug
    say "building (debug)"
    cargo build -q --bin connect
    cargo build -q --example bench
else
    PROFILE_DIR=release
    say "building (release)"
    cargo build -q --release --bin connect
    cargo build -q --release --example bench
fi
# BENCH_CONNECT may name another build of `connect` (e.g. main's, for before/after profiles).
BIN="${BENCH_CONNECT:-$ROOT/target/$PROFILE_DIR/connect}"
BENCH="$ROOT/target/$PROFILE_DIR/examples/bench"

# --- work folder and cleanup -------------------------------------------------------------
WORK=$(mktemp -d /tmp/scim-connect-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -f "$WORK/nginx.pid" ]; then kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"

mapfile -t PORTS < <("$BENCH" ports 7)
P_NGINX=${PORTS[0]} P_HOLD=${PORTS[1]}
P_RN_CTRL=${PORTS[2]} P_RN_VISIT=${PORTS[3]} P_RT_CTRL=${PORTS[4]} P_RT_VISIT=${PORTS[5]}

USER_ID=7d3f9b2c-41a8-4e0f-9c61-2b8e5a17d094
URL_PATH="/scim/v2/Users/$USER_ID"

# --- nginx: the one origin -----------------------------------------------------------------
mkdir -p "$WORK/www/scim/v2/Users" "$WORK/nginx-tmp"
cp "$ROOT/bench/user.json" "$WORK/www/scim/v2/Users/$USER_ID"
cat >"$WORK/nginx.conf" <<EOF
# Debian's defaults where they matter (worker_processes auto, sendfile on, tcp_nopush on);
# no access log, so disk writes do not enter the figures.
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
    sendfile on;
    tcp_nopush on;
    access_log off;
    client_body_temp_path $WORK/nginx-tmp;
    proxy_temp_path $WORK/nginx-tmp;
    fastcgi_temp_path $WORK/nginx-tmp;
    uwsgi_temp_path $WORK/nginx-tmp;
    scgi_temp_path $WORK/nginx-tmp;
    server {
        listen 127.0.0.1:$P_NGINX;
        root $WORK/www;
        location /scim/v2/Users/ { default_type application/scim+json; }
    }
}
EOF
"$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log" -g 'user root;' 2>/dev/null \
    || "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"

wait_ok() { # url [curl args...]: until it answers 200, at most 30 s
    local url=$1; shift
    for _ in $(seq 300); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true)" = 200 ]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
DIRECT_URL="http://127.0.0.1:$P_NGINX$URL_PATH"
wait_ok "$DIRECT_URL" || die "nginx does not answer at $DIRECT_URL (see $WORK/nginx-error.log)"

# --- hub and agent: the real binary, separate processes --------------------------------------
eval "$("$BENCH" files --dir "$WORK/deploy" --nginx "127.0.0.1:$P_NGINX" --hold "127.0.0.1:$P_HOLD")"
ADMIN_TOKEN=$(cat "$ADMIN_TOKEN_FILE")
# Logs at the default level (info: one line per forwarded request), kept to their last lines.
${BENCH_WRAP_HUB:-} "$BIN" hub --config "$HUB_TOML" 2> >(tail -n 200 >"$WORK/hub.log") &
HUB_PID=$!; PIDS+=("$HUB_PID")
${BENCH_WRAP_AGENT:-} "$BIN" run --config "$AGENT_INI" 2> >(tail -n 200 >"$WORK/agent.log") &
AGENT_PID=$!; PIDS+=("$AGENT_PID")
TUNNEL_URL="http://$ADMIN_ADDR/api/apps/nginx/scim/Users/$USER_ID"
AUTH="Authorization: Bearer $ADMIN_TOKEN"
wait_ok "$TUNNEL_URL" -H "$AUTH" || wait_ok "$TUNNEL_URL" -H "$AUTH" || die "no answer through the tunnel at $TUNNEL_URL"

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
forwarded() { # the agent's forwarded count for target nginx
    "$BIN" status --config "$AGENT_INI" --json \
        | tr -d ' \n' | grep -o '"name":"nginx"[^}]*' | grep -o '"forwarded":[0-9]*' | cut -d: -f2
}

