#!/usr/bin/env bash
# Benchmarks of scim-connect (see "Benchmarks" in README.md):
#   B1 forward overhead: wrk GETs a static SCIM User from nginx directly, through the hub's
#      admin pass-through -> tunnel -> agent, and through rathole (noise and tcp transports)
#   B2 initial provisioning, B3 no-change resync (examples/bench.rs provision)
#   B4 agent footprint: RSS idle and at 1,000 requests in flight, CPU per 10,000 forwards
# and prints one table with every figure and the command behind it.
#
#   bench/run.sh            the full run (release build; B1-B4 take about 7 minutes on 2 cores)
#   bench/run.sh --smoke    a few seconds of each workload with the debug build, no rathole:
#                           checks the harness end to end, the figures mean nothing
#
# Options: --runs N (B1 repetitions, median reported; default 3), --duration S (seconds per
# B1 point; default 10), --users N (B2 size; default 10000), --b3-users N (default 100000),
# --groups N (default 100), --no-rathole.
#
# Installs what it lacks, idempotently: nginx, wrk (apt-get), rathole (cargo install into
# bench/.tools). Everything listens on 127.0.0.1 at free ports and is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0
RUNS=3
DURATION=10
USERS=10000
B3_USERS=100000
NGROUPS=100
CONNS="1 16 64"
RATHOLE=1
INFLIGHT=1000
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --runs) RUNS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --users) USERS=$2; shift ;;
        --b3-users) B3_USERS=$2; shift ;;
        --groups) NGROUPS=$2; shift ;;
        --no-rathole) RATHOLE=0 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$SMOKE" = 1 ]; then
    RUNS=1 DURATION=1 USERS=300 B3_USERS=300 NGROUPS=3 CONNS="1 16" RATHOLE=0 INFLIGHT=100
fi

source "$ROOT/bench/lib.sh"

# --- rathole -------------------------------------------------------------------------------
if [ "$RATHOLE" = 1 ]; then
    keys=$("$RATHOLE_BIN" --genkey)
    PRIV=$(echo "$keys" | sed -n '/Private Key/{n;p}')
    PUB=$(echo "$keys" | sed -n '/Public Key/{n;p}')
    RTOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n")
    for kind in noise tcp; do
        if [ $kind = noise ]; then ctrl=$P_RN_CTRL visit=$P_RN_VISIT; else ctrl=$P_RT_CTRL visit=$P_RT_VISIT; fi
        {
            echo "[server]"; echo "bind_addr = \"127.0.0.1:$ctrl\""
            echo "[server.transport]"; echo "type = \"$kind\""
            [ $kind = noise ] && { echo "[server.transport.noise]"; echo "local_private_key = \"$PRIV\""; }
            echo "[server.services.scim]"; echo "token = \"$RTOKEN\""; echo "bind_addr = \"127.0.0.1:$visit\""
        } >"$WORK/rathole-$kind-server.toml"
        {
            echo "[client]"; echo "remote_addr = \"127.0.0.1:$ctrl\""
            echo "[client.transport]"; echo "type = \"$kind\""
            [ $kind = noise ] && { echo "[client.transport.noise]"; echo "remote_public_key = \"$PUB\""; }
            echo "[client.services.scim]"; echo "token = \"$RTOKEN\""; echo "local_addr = \"127.0.0.1:$P_NGINX\""
        } >"$WORK/rathole-$kind-client.toml"
        chmod 600 "$WORK"/rathole-$kind-*.toml
        RUST_LOG=warn "$RATHOLE_BIN" --server "$WORK/rathole-$kind-server.toml" 2>>"$WORK/rathole.log" >&2 &
        PIDS+=($!)
        RUST_LOG=warn "$RATHOLE_BIN" --client "$WORK/rathole-$kind-client.toml" 2>>"$WORK/rathole.log" >&2 &
        PIDS+=($!)
        wait_ok "http://127.0.0.1:$visit$URL_PATH" || die "rathole ($kind) does not answer"
    done
fi

# --- B4 idle: before any load, tunnel up -------------------------------------------------------
sleep 2
B4_IDLE_KIB=$(rss_kib "$AGENT_PID")

# --- B1 --------------------------------------------------------------------------------------
# to_ms VALUE-WITH-UNIT (wrk prints us, ms or s)
to_ms() { echo "$1" | awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v/=1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v*=1000 } ; printf "%.3f", v }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

declare -A URL CMD RPS P50 P99
PATHS="direct tunnel"
URL[direct]=$DIRECT_URL
URL[tunnel]=$TUNNEL_URL
if [ "$RATHOLE" = 1 ]; then
    PATHS="direct tunnel rathole-noise rathole-tcp"
    URL[rathole-noise]="http://127.0.0.1:$P_RN_VISIT$URL_PATH"
    URL[rathole-tcp]="http://127.0.0.1:$P_RT_VISIT$URL_PATH"
fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for run in $(seq "$RUNS"); do
    for c in $CONNS; do
        for p in $PATHS; do
            args=(-t1 "-c$c" "-d${DURATION}s" --latency)
            shown="wrk ${args[*]}"
            if [ "$p" = tunnel ]; then
                args+=(-H "$AUTH")
                shown+=" -H 'Authorization: Bearer ***'"
            fi
            CMD[$p,$c]="$shown ${URL[$p]}"
            out=$(wrk "${args[@]}" "${URL[$p]}")
            if echo "$out" | grep -q -E 'Non-2xx|Socket errors'; then
                echo "$out" >&2
                die "B1 $p c=$c: errors (above); logs in $WORK"
            fi
            rps=$(echo "$out" | awk '/^Requests\/sec:/{print $2}')
            p50=$(to_ms "$(echo "$out" | awk '$1=="50%"{print $2}')")
            p99=$(to_ms "$(echo "$out" | awk '$1=="99%"{print $2}')")
            [ -n "$rps" ] || die "B1 $p c=$c: no figures in wrk's output"
            RPS[$p,$c]+=" $rps"; P50[$p,$c]+=" $p50"; P99[$p,$c]+=" $p99"
            say "B1 run $run c=$c $p: $rps req/s, p50 $p50 ms, p99 $p99 ms"
        done
    done
done

# --- B4: CPU per 10,000 forwards, then 1,000 in flight -------------------------------------------
f0=$(forwarded); t0=$(cpu_ticks "$AGENT_PID")
B4_CPU_CMD="wrk -t1 -c16 -d${DURATION}s -H 'Authorization: Bearer ***' $TUNNEL_URL"
wrk -t1 -c16 "-d${DURATION}s" -H "$AUTH" "$TUNNEL_URL" >/dev/null
f1=$(forwarded); t1=$(cpu_ticks "$AGENT_PID")
HZ=$(getconf CLK_TCK)
B4_FWD=$((f1 - f0))
B4_CPU=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$B4_FWD" 'BEGIN { printf "%.2f", (t / hz) / (n / 10000) }')
B4_IDLE_AFTER_KIB=$(rss_kib "$AGENT_PID")

B4_INFLIGHT_CMD="target/$PROFILE_DIR/examples/bench inflight --count $INFLIGHT ..."
out=$("$BENCH" inflight --admin "$ADMIN_ADDR" --token-file "$ADMIN_TOKEN_FILE" \
    --hold "127.0.0.1:$P_HOLD" --count "$INFLIGHT" --agent-pid "$AGENT_PID" \
    --agent-socket "$AGENT_SOCKET") || die "B4: holding $INFLIGHT requests in flight failed"
eval "$out"
LOAD_B1_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- B2 and B3 ---------------------------------------------------------------------------------
B2_CMD="target/$PROFILE_DIR/examples/bench provision --users $USERS --groups $NGROUPS"
out=$("$BENCH" provision --users "$USERS" --groups "$NGROUPS") || die "B2: provisioning failed"
eval "$out"
B2_LINE="$b2_users users + $b2_groups groups + $b2_memberships memberships = $b2_objects objects in $b2_wall_s s: $b2_objects_per_s objects/s ($b2_requests requests)"
B2_RATE=$b2_objects_per_s
# B3 resyncs users only (provision_groups = false): with groups, the hub lists every group of
# a page with all its members, and 100 groups of 1,000 are one 16.9 MB answer, over the
# tunnel's 16 MiB frame limit (README, Benchmarks).
B3_CMD="target/$PROFILE_DIR/examples/bench provision --users $B3_USERS --groups $NGROUPS --users-only"
out=$("$BENCH" provision --users "$B3_USERS" --groups "$NGROUPS" --users-only) || die "B3: provisioning failed"
eval "$out"
B2_BIG_LINE="$b2_users users, no groups, in $b2_wall_s s: $b2_objects_per_s objects/s ($b2_requests requests)"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- the table -----------------------------------------------------------------------------------
yes_no() { awk "BEGIN { print ($1) ? \"yes\" : \"**no**\" }"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
MEM_GIB=$(awk '/^MemTotal:/{printf "%.0f", $2/1048576}' /proc/meminfo)
echo
echo "scim-connect benchmarks — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, ${MEM_GIB} GiB, $(uname -r)"
echo "load average (1/5/15 min): $LOAD_START at the start of B1, $LOAD_B1_END after B4, $LOAD_END at the end"
[ "$SMOKE" = 1 ] && echo "SMOKE RUN: debug build, 1 s points — these figures mean nothing"
echo "B1: median of $RUNS runs of ${DURATION} s per point; nginx $("$NGINX" -v 2>&1 | cut -d/ -f2), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
echo
echo "| workload | measured | target | met | command |"
echo "| --- | --- | --- | --- | --- |"
for c in $CONNS; do
    for p in $PATHS; do
        rps=$(echo "${RPS[$p,$c]}" | median); p50=$(echo "${P50[$p,$c]}" | median); p99=$(echo "${P99[$p,$c]}" | median)
        d_rps=$(echo "${RPS[direct,$c]}" | median); d_p50=$(echo "${P50[direct,$c]}" | median)
        figure="$(printf '%.0f' "$rps") req/s, p50 $p50 ms, p99 $p99 ms"
        target="" met=""
        if [ "$p" != direct ]; then
            figure+="; $(ratio "$rps" "$d_rps")× direct"
            if [ "$RATHOLE" = 1 ] && [ "$p" != rathole-noise ]; then
                figure+=", $(ratio "$rps" "$(echo "${RPS[rathole-noise,$c]}" | median)")× rathole-noise"
            fi
            if [ "$RATHOLE" = 1 ] && [ "$p" = tunnel ]; then
                figure+=", $(ratio "$rps" "$(echo "${RPS[rathole-tcp,$c]}" | median)")× rathole-tcp"
            fi
        fi
        if [ "$p" = tunnel ] && [ "$c" = 1 ]; then
            extra=$(awk -v a="$p50" -v b="$d_p50" 'BEGIN { printf "%.0f", (a - b) * 1000 }')
            figure+="; p50 +${extra} µs over direct"
            target="p50 ≤ direct + 150 µs"
            met=$(yes_no "$extra <= 150")
        fi
        if [ "$p" = tunnel ] && [ "$c" = 64 ]; then
            n_rps=$(echo "${RPS[rathole-noise,$c]:-0}" | median)
            target="≥ 0.5× direct, ≥ 2× rathole-noise, p99 ≤ 5 ms"
            met=$(yes_no "$rps >= 0.5 * $d_rps && $rps >= 2 * ${n_rps/nan/0} && $p99 <= 5")
        fi
        echo "| B1 $p, $c conn | $figure | $target | $met | \`${CMD[$p,$c]}\` |"
    done
done
echo "| B2 initial provisioning | $B2_LINE | ≥ 2,000 objects/s | $(yes_no "$B2_RATE >= 2000") | \`$B2_CMD\` |"
echo "| B2 at $B3_USERS users | $B2_BIG_LINE | | | \`$B3_CMD\` (first run) |"
echo "| B3 no-change resync | $b3_users users: $b3_wall_s s, $b3_requests requests | ≤ 10 s, ≤ 250 requests | $(yes_no "$b3_wall_s <= 10 && $b3_requests <= 250") | \`$B3_CMD\` (second run) |"
idle_mib=$(awk -v k="$B4_IDLE_KIB" 'BEGIN { printf "%.1f", k / 1024 }')
after_mib=$(awk -v k="$B4_IDLE_AFTER_KIB" 'BEGIN { printf "%.1f", k / 1024 }')
held_mib=$(awk -v k="$b4_inflight_rss_kib" 'BEGIN { printf "%.1f", k / 1024 }')
echo "| B4 agent RSS, idle | $idle_mib MiB with the tunnel up, before any load ($after_mib MiB idle after B1) | ≤ 20 MiB | $(yes_no "$idle_mib <= 20") | \`grep VmRSS /proc/<agent>/status\` |"
echo "| B4 agent RSS, $b4_inflight in flight | $held_mib MiB ($b4_inflight_at_origin at the origin, the rest queued at the agent's per-target bound) | ≤ 64 MiB | $(yes_no "$held_mib <= 64") | \`$B4_INFLIGHT_CMD\` |"
echo "| B4 agent CPU | $B4_CPU CPU s per 10,000 forwards ($B4_FWD forwards) | | | \`$B4_CPU_CMD\` |"
