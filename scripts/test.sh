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

# Versions checked to install and work together here; change them together.
PY_PACKAGES=(
  scim2-server==0.8.3
  scim2-cli==0.6.0
  scim2-tester==0.5.2
  scim2-models==0.12.3
  scim2-client==0.13.2
)

START=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - START))" "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Python test peers ------------------------------------------------------------------
# The stamp records what was installed, so a changed pin reinstalls and an unchanged one is free.
STAMP=$VENV/.scim-connect-packages
WANT="${PY_PACKAGES[*]}"
if [ -x "$VENV/bin/scim2-server" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  step "Python test peers present in .venv: $WANT"
else
  if [ ! -x "$VENV/bin/python" ]; then
    step "create .venv (python3 -m venv)"
    if ! python3 -m venv "$VENV"; then
      # Debian's system python needs python3-venv for ensurepip.
      rm -rf "$VENV"
      step "python3 -m venv failed: installing Debian's python3-venv"
      as_root apt-get update
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
      python3 -m venv "$VENV"
    fi
  fi
  step "pip install ${PY_PACKAGES[*]}"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  printf '%s' "$WANT" > "$STAMP"
fi

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
if cargo nextest --version >/dev/null 2>&1; then
  step "cargo nextest run (SCIM2_SERVER_BIN=$SCIM2_SERVER_BIN)"
  exec cargo nextest run --no-fail-fast
else
  step "cargo test --all-targets (cargo-nextest not installed; SCIM2_SERVER_BIN=$SCIM2_SERVER_BIN)"
  exec cargo test --all-targets --no-fail-fast
fi
