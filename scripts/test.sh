#!/usr/bin/env bash
# The project's one test command, used by developers and by CI (.ci/run).
# Installs the real test peers it needs when they are missing (scim2-server & co. into .venv,
# tinyproxy and systemd-analyze from Debian, scimmy from npm into tests/scimmy, cargo-fuzz from
# crates.io), then runs fmt, clippy, a short bounded fuzzing run (scripts/fuzz.sh) and the whole
# test suite. Safe to re-run: the installs are skipped once done, so a second run costs only the
# cargo steps.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv

START=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - START))" "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Python test peers (scripts/python-peers.sh) ---------------------------------------------
# shellcheck source=scripts/python-peers.sh
source "$ROOT/scripts/python-peers.sh"
ensure_python_peers

# --- tinyproxy (Debian) for the HTTP CONNECT proxy tests -------------------------------------
if command -v tinyproxy >/dev/null 2>&1; then
  step "tinyproxy present ($(command -v tinyproxy))"
else
  step "apt-get install tinyproxy"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y tinyproxy
fi

# --- scimmy (npm) for the second SCIM server: an express app in tests/scimmy ----------------
# Node from Debian when missing; the packages from the committed lock with `npm ci`. A stamp
# holding the lock's hash makes the install free while the lock is unchanged.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  step "apt-get install nodejs npm"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
fi
SCIMMY_DIR=$ROOT/tests/scimmy
SCIMMY_STAMP=$SCIMMY_DIR/node_modules/.scim-connect-lock
SCIMMY_WANT=$(sha256sum "$SCIMMY_DIR/package-lock.json" | cut -d' ' -f1)
if [ -d "$SCIMMY_DIR/node_modules/scimmy-routers" ] &&
  [ "$(cat "$SCIMMY_STAMP" 2>/dev/null)" = "$SCIMMY_WANT" ]; then
  step "scimmy present in tests/scimmy/node_modules (node $(node --version))"
else
  step "npm ci in tests/scimmy (scimmy, scimmy-routers, express 4)"
  (cd "$SCIMMY_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  printf '%s' "$SCIMMY_WANT" > "$SCIMMY_STAMP"
fi

# --- systemd-analyze (Debian's systemd) to verify packaging/connect-agent.service -----------
if command -v systemd-analyze >/dev/null 2>&1; then
  step "systemd-analyze present ($(command -v systemd-analyze))"
else
  step "apt-get install systemd (for systemd-analyze verify)"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd
fi

export SCIM2_SERVER_BIN=$VENV/bin/scim2-server
export TINYPROXY_BIN
TINYPROXY_BIN=$(command -v tinyproxy)

# --- Rust checks ----------------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --check

step "cargo fmt --check (fuzz/)"
cargo fmt --check --manifest-path fuzz/Cargo.toml

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# --- Fuzzing: a short bounded run of every target in fuzz/ (installs cargo-fuzz once). ---------
# FUZZ_SECONDS per target; 0 skips. Longer runs: ./scripts/fuzz.sh 600
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  step "scripts/fuzz.sh $FUZZ_SECONDS (each fuzz target for $FUZZ_SECONDS s)"
  ./scripts/fuzz.sh "$FUZZ_SECONDS"
fi

# Nothing may be printed after the test runner: its closing summary line is the run's verdict.
# With nextest, two steps (.config/nextest.toml): the fault-injection suite, bounded as a whole
# by its profile's global-timeout, then every other test. Their filters are complements, so each
# test runs exactly once; a failing fault suite ends the script with its own summary.
if cargo nextest --version >/dev/null 2>&1; then
  step "fault-injection suite: cargo nextest run --profile faults (SCIM2_SERVER_BIN=$SCIM2_SERVER_BIN)"
  cargo nextest run --profile faults --no-fail-fast
  step "every other test: cargo nextest run --profile rest"
  exec cargo nextest run --profile rest --no-fail-fast
else
  step "cargo test --all-targets (cargo-nextest not installed; SCIM2_SERVER_BIN=$SCIM2_SERVER_BIN)"
  exec cargo test --all-targets --no-fail-fast
fi
