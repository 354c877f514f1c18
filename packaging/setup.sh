#!/usr/bin/env bash
# Installs the scim-connect agent as a systemd service running as an unprivileged user.
#
#   sudo packaging/setup.sh --binary target/release/connect
#
# What it does (every step is idempotent, so re-running it upgrades the binary in place):
#   1. installs the binary as /opt/connect/connect (root-owned, 0755);
#   2. creates the system user and group `connect` (no login shell, no home);
#   3. creates /opt/connect/config.ini from the sample (mode 0600, owned by `connect`) unless one
#      exists — an existing config.ini is never overwritten, only its mode and owner are fixed;
#   4. creates the state directory /var/lib/connect (mode 0700, owned by `connect`);
#   5. installs /etc/systemd/system/connect-agent.service and enables it (`--start` also starts
#      it; without it, edit config.ini first, then `systemctl start connect-agent`).
#
# Options:
#   --binary PATH   the `connect` binary to install (default: ./connect beside this script,
#                   else target/release/connect of the source tree)
#   --config PATH   the config.ini to install when none exists yet (default: config/config.ini)
#   --root DIR      install under DIR instead of / (DESTDIR style: the paths inside the unit and
#                   config.ini stay /opt/connect and /var/lib/connect), in dry mode: the steps
#                   that touch the running system (user creation, systemctl) are printed, not run
#   --user NAME     the service user (default: connect); its primary group owns the files too
#   --start         start (or restart) the service after enabling it
#   -h, --help      this text
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(dirname "$HERE")

INSTALL_DIR=/opt/connect
STATE_DIR=/var/lib/connect
UNIT_NAME=connect-agent.service
UNIT_DIR=/etc/systemd/system

ROOT=/
BINARY=
CONFIG=$SRC/config/config.ini
SERVICE_USER=connect
DRY=0
START=0

die() { printf 'setup.sh: %s\n' "$*" >&2; exit 2; }
say() { printf '%s\n' "$*"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case $1 in
    --binary) [ $# -ge 2 ] || die "--binary needs a path"; BINARY=$2; shift 2 ;;
    --binary=*) BINARY=${1#*=}; shift ;;
    --config) [ $# -ge 2 ] || die "--config needs a path"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --root|--destdir) [ $# -ge 2 ] || die "$1 needs a directory"; ROOT=$2; shift 2 ;;
    --root=*|--destdir=*) ROOT=${1#*=}; shift ;;
    --user) [ $# -ge 2 ] || die "--user needs a name"; SERVICE_USER=$2; shift 2 ;;
    --user=*) SERVICE_USER=${1#*=}; shift ;;
    --start) START=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

case $SERVICE_USER in
  ''|-*|*[!a-z0-9_-]*) die "--user $SERVICE_USER: use lower-case letters, digits, _ and -" ;;
esac

if [ -z "$BINARY" ]; then
  if [ -x "$HERE/connect" ]; then BINARY=$HERE/connect; else BINARY=$SRC/target/release/connect; fi
fi
[ -f "$BINARY" ] && [ -x "$BINARY" ] || die "binary $BINARY not found or not executable: build it with \`cargo build --release\` or pass --binary PATH"
[ -f "$HERE/$UNIT_NAME" ] || die "$HERE/$UNIT_NAME is missing: run setup.sh from the source tree's packaging/ folder"

mkdir -p "$ROOT" 2>/dev/null || die "--root $ROOT: cannot create it"
ROOT=$(cd "$ROOT" && pwd)
if [ "$ROOT" = / ]; then
  P=
else
  P=$ROOT
  DRY=1
fi
if [ "$ROOT" = / ] && [ "$(id -u)" -ne 0 ]; then
  die "installing into / needs root: run it with sudo (or pass --root DIR to try it out)"
fi

# Runs a command that changes the running system, or only shows it in dry mode (--root).
system() {
  local shown
  shown=$(printf '%q ' "$@")
  if [ "$DRY" -eq 1 ]; then
    say "dry run, would run: ${shown% }"
  else
    say "run: ${shown% }"
    "$@"
  fi
}

# The owner the files get: the service user when it exists and we may chown.
OWNER=
if [ "$(id -u)" -eq 0 ] && getent passwd "$SERVICE_USER" >/dev/null; then
  OWNER="$SERVICE_USER:$(id -gn "$SERVICE_USER")"
fi

# 1. The binary.
install -d -m 0755 "$P$INSTALL_DIR"
install -m 0755 "$BINARY" "$P$INSTALL_DIR/connect.new"
mv -f "$P$INSTALL_DIR/connect.new" "$P$INSTALL_DIR/connect"
say "installed $P$INSTALL_DIR/connect"

# 2. The user.
if getent passwd "$SERVICE_USER" >/dev/null; then
  say "user $SERVICE_USER exists"
else
  NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
  system useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
    --shell "$NOLOGIN" --comment "scim-connect agent" "$SERVICE_USER"
  if [ "$DRY" -eq 0 ]; then OWNER="$SERVICE_USER:$(id -gn "$SERVICE_USER")"; fi
fi

# Sets owner (when known) and mode of a path.
own() {
  local mode=$1 path=$2
  chmod "$mode" "$path"
  if [ -n "$OWNER" ]; then
    chown "$OWNER" "$path"
  else
    say "note: $path not given to $SERVICE_USER (user missing or not root): chown $SERVICE_USER $path"
  fi
}

# 3. config.ini: created once, never overwritten.
TARGET_CONFIG=$P$INSTALL_DIR/config.ini
if [ -e "$TARGET_CONFIG" ]; then
  say "kept the existing $TARGET_CONFIG"
else
  [ -f "$CONFIG" ] || die "--config $CONFIG not found"
  TMP=$(mktemp "$P$INSTALL_DIR/.config.ini.XXXXXX")
  chmod 0600 "$TMP"
  # The service keeps its state in the state directory, not beside the read-only config.
  sed "s|^state_dir[[:space:]]*=.*|state_dir = $STATE_DIR|" "$CONFIG" > "$TMP"
  grep -q "^state_dir = $STATE_DIR\$" "$TMP" || printf '\nstate_dir = %s\n' "$STATE_DIR" >> "$TMP"
  mv -f "$TMP" "$TARGET_CONFIG"
  say "created $TARGET_CONFIG from $CONFIG: set service_id and hub, then declare targets with"
  say "  $INSTALL_DIR/connect set-target <name> <host:port> -config $INSTALL_DIR/config.ini"
fi
own 0600 "$TARGET_CONFIG"

# 4. The state directory (the unit's StateDirectory= would create it too, at first start).
install -d -m 0700 "$P$STATE_DIR"
own 0700 "$P$STATE_DIR"
say "state directory $P$STATE_DIR"

# 5. The unit.
UNIT=$HERE/$UNIT_NAME
if [ "$SERVICE_USER" != connect ]; then
  UNIT_TMP=$(mktemp)
  sed -e "s|^User=connect\$|User=$SERVICE_USER|" \
      -e "s|^Group=connect\$|Group=$(id -gn "$SERVICE_USER" 2>/dev/null || echo "$SERVICE_USER")|" \
      "$HERE/$UNIT_NAME" > "$UNIT_TMP"
  UNIT=$UNIT_TMP
fi
install -D -m 0644 "$UNIT" "$P$UNIT_DIR/$UNIT_NAME"
[ "$UNIT" = "$HERE/$UNIT_NAME" ] || rm -f "$UNIT"
say "installed $P$UNIT_DIR/$UNIT_NAME"
system systemctl daemon-reload
system systemctl enable "$UNIT_NAME"
if [ "$START" -eq 1 ]; then
  system systemctl restart "$UNIT_NAME"
else
  say "start it with: systemctl start ${UNIT_NAME%.service} (after editing $INSTALL_DIR/config.ini)"
fi
