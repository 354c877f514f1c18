# Sourced by scripts/test.sh and scripts/soak.sh: installs the Python test peers (scim2-server
# & co.) into $ROOT/.venv when they are missing or their pins changed. Needs ROOT and the
# `step` and `as_root` functions of the sourcing script.

# Versions checked to install and work together here; change them together.
PY_PACKAGES=(
  scim2-server==0.8.3
  scim2-cli==0.6.0
  scim2-tester==0.5.2
  scim2-models==0.12.3
  scim2-client==0.13.2
)

ensure_python_peers() {
  local venv=$ROOT/.venv
  # The stamp records what was installed, so a changed pin reinstalls and an unchanged one is
  # free.
  local stamp=$venv/.scim-connect-packages
  local want="${PY_PACKAGES[*]}"
  if [ -x "$venv/bin/scim2-server" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    step "Python test peers present in .venv: $want"
    return
  fi
  if [ ! -x "$venv/bin/python" ]; then
    step "create .venv (python3 -m venv)"
    if ! python3 -m venv "$venv"; then
      # Debian's system python needs python3-venv for ensurepip.
      rm -rf "$venv"
      step "python3 -m venv failed: installing Debian's python3-venv"
      as_root apt-get update
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
      python3 -m venv "$venv"
    fi
  fi
  step "pip install ${PY_PACKAGES[*]}"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  printf '%s' "$want" > "$stamp"
}
