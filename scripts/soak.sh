#!/usr/bin/env bash
# The soak: continuous syncs of a few thousand users through a failover pair of agents while
# agents, the hub and the SCIM server are killed and restarted at random, then an exact check
# of what the SCIM server holds. See README ("Soak") and scripts/soak.py.
#
#   scripts/soak.sh [--minutes N] [--users N] [--seed S] [--keep]
#
# Defaults: 10 minutes of faults, 3000 people, a random seed (printed, with the command line
# that reproduces the run). Builds the release binary, uses $SCIM2_SERVER_BIN when set, else
# installs scim2-server into .venv like scripts/test.sh. Exit code 0 only when the SCIM server
# ends with no duplicate, nothing missing, nothing extra and nothing wrong.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

START=$SECONDS
step() { printf '==> [%ss] %s\n' "$((SECONDS - START))" "$*"; }
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ -n "${SCIM2_SERVER_BIN:-}" ] && [ -x "$SCIM2_SERVER_BIN" ]; then
  step "scim2-server: $SCIM2_SERVER_BIN"
else
  # shellcheck source=scripts/python-peers.sh
  source "$ROOT/scripts/python-peers.sh"
  ensure_python_peers
  SCIM2_SERVER_BIN=$ROOT/.venv/bin/scim2-server
fi
# The same venv's interpreter runs the driver (standard library only).
PYTHON=$(dirname "$SCIM2_SERVER_BIN")/python3

if ! command -v openssl >/dev/null 2>&1; then
  step "apt-get install openssl (the hub's test certificate)"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y openssl
fi

step "cargo build --release --bin connect"
cargo build --release --bin connect

exec "$PYTHON" "$ROOT/scripts/soak.py" --connect "$ROOT/target/release/connect" \
  --scim2-server "$SCIM2_SERVER_BIN" --out "$ROOT/target/soak" "$@"
