#!/usr/bin/env bash
# Instruction counts of the forwarding path, stable under load (valgrind's callgrind):
# runs the agent or the hub under callgrind, sends --requests GETs of the B1 origin through the
# admin pass-through and the tunnel (after a warm-up that is not counted), and prints the
# instructions per request. The profile is kept in target/bench-profiles/ for
# `callgrind_annotate`.
#
#   bench/profile.sh agent|hub [--requests N] [--conns C]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0 RATHOLE=0
WHO=${1:?usage: bench/profile.sh agent|hub [--requests N] [--conns C]}
shift
REQUESTS=2000 CONNS=8
while [ $# -gt 0 ]; do
    case "$1" in
        --requests) REQUESTS=$2; shift ;;
        --conns) CONNS=$2; shift ;;
        *) echo "bench/profile.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
command -v valgrind >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
OUT_DIR="$ROOT/target/bench-profiles"
mkdir -p "$OUT_DIR"
OUT="$OUT_DIR/$WHO-$(date +%Y%m%d-%H%M%S).callgrind"
WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT --collect-atstart=yes"
case "$WHO" in
    agent) BENCH_WRAP_AGENT=$WRAP ;;
    hub) BENCH_WRAP_HUB=$WRAP ;;
    *) echo "bench/profile.sh: profile the agent or the hub, not $WHO" >&2; exit 2 ;;
esac
source "$ROOT/bench/lib.sh"
[ "$WHO" = agent ] && PID=$AGENT_PID || PID=$HUB_PID
run_count() {
    "$BENCH" get --count "$1" --conns "$CONNS" --token-file "$ADMIN_TOKEN_FILE" "$TUNNEL_URL" >/dev/null
}
run_count 200
callgrind_control -z "$PID" >/dev/null
run_count "$REQUESTS"
callgrind_control -d "$PID" >/dev/null
sleep 1
# The dump after zeroing is the file with the highest part number.
PART=$(ls -1 "$OUT".* 2>/dev/null | sort -t. -k3 -n | tail -1)
[ -n "$PART" ] || die "callgrind wrote no dump"
IR=$(awk '/^summary:/{print $2}' "$PART")
echo "$WHO: $IR instructions for $REQUESTS requests ($((IR / REQUESTS)) per request) at $CONNS connections; profile $PART"
