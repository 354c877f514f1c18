#!/usr/bin/env bash
# Where a forwarded request's CPU time goes (see "Benchmarks" in README.md): sends a fixed number
# of GETs of the B1 origin directly to nginx and through hub -> tunnel -> agent -> nginx, and
# prints for each process (load generator, hub, agent, nginx) the CPU time (user + kernel,
# perf's task-clock) and the context switches per request. On a machine whose every core is
# busy, the sum over the processes is what bounds the requests per second.
#
#   bench/cost.sh [--requests N] [--conns C]      (release build; run it under the lock)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0 RATHOLE=0
REQUESTS=20000 CONNS=16
while [ $# -gt 0 ]; do
    case "$1" in
        --requests) REQUESTS=$2; shift ;;
        --conns) CONNS=$2; shift ;;
        *) echo "bench/cost.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
command -v perf >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
source "$ROOT/bench/lib.sh"
NGINX_WORKERS=$(pgrep -P "$(cat "$WORK/nginx.pid")" | paste -sd, -)

# measure LABEL URL [--token-file FILE]: one line per process
measure() {
    local label=$1 url=$2; shift 2
    local role pid
    declare -A PERF_PID
    for role in hub agent nginx; do
        case $role in hub) pid=$HUB_PID ;; agent) pid=$AGENT_PID ;; nginx) pid=$NGINX_WORKERS ;; esac
        perf stat -x, -e task-clock,context-switches -p "$pid" -o "$WORK/perf-$role" &
        PERF_PID[$role]=$!
    done
    sleep 0.5
    local ticks0 ticks1
    ticks0=$(awk '{print $14, $15}' "/proc/$HUB_PID/stat" "/proc/$AGENT_PID/stat" | paste -sd' ' -)
    perf stat -x, -e task-clock,context-switches -o "$WORK/perf-load" \
        "$BENCH" get --count "$REQUESTS" --conns "$CONNS" "$@" "$url" >"$WORK/get.out"
    ticks1=$(awk '{print $14, $15}' "/proc/$HUB_PID/stat" "/proc/$AGENT_PID/stat" | paste -sd' ' -)
    for role in hub agent nginx; do kill -INT "${PERF_PID[$role]}"; done
    for role in hub agent nginx; do wait "${PERF_PID[$role]}" || true; done
    local wall
    wall=$(awk -F= '/^get_wall_s=/{print $2}' "$WORK/get.out")
    printf '%-7s %d GETs at %d connections in %s s (%.0f req/s)\n' "$label" "$REQUESTS" "$CONNS" \
        "$wall" "$(awk -v n="$REQUESTS" -v w="$wall" 'BEGIN { print n / w }')"
    local total=0
    for role in load hub agent nginx; do
        [ "$label" = direct ] && { [ $role = hub ] || [ $role = agent ]; } && continue
        read -r ms cs < <(awk -F, '$3=="task-clock"{ms=$1} $3=="context-switches"{cs=$1} END { print ms, cs }' "$WORK/perf-$role")
        printf '  %-6s %7.1f µs CPU, %5.2f context switches per request\n' "$role" \
            "$(awk -v m="$ms" -v n="$REQUESTS" 'BEGIN { print m * 1000 / n }')" \
            "$(awk -v c="$cs" -v n="$REQUESTS" 'BEGIN { print c / n }')"
        if [ $role = hub ] || [ $role = agent ]; then
            # user and kernel shares from /proc (clock ticks, so only roughly)
            awk -v a="$ticks0" -v b="$ticks1" -v r=$role 'BEGIN {
                split(a, x, " "); split(b, y, " "); i = (r == "hub") ? 1 : 3
                u = y[i] - x[i]; k = y[i+1] - x[i+1]
                if (u + k > 0) printf "         (%.0f %% in user space, %.0f %% in the kernel)\n", 100 * u / (u + k), 100 * k / (u + k) }'
        fi
        total=$(awk -v t="$total" -v m="$ms" -v n="$REQUESTS" 'BEGIN { print t + m * 1000 / n }')
    done
    printf '  all    %7.1f µs CPU per request: at most %.0f req/s on %d cores\n' "$total" \
        "$(awk -v t="$total" -v c="$(nproc)" 'BEGIN { print c * 1000000 / t }')" "$(nproc)"
}

"$BENCH" get --count 500 --conns "$CONNS" --token-file "$ADMIN_TOKEN_FILE" "$TUNNEL_URL" >/dev/null
measure direct "$DIRECT_URL"
measure tunnel "$TUNNEL_URL" --token-file "$ADMIN_TOKEN_FILE"
