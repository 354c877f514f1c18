#!/usr/bin/env bash
# Bounded coverage-guided fuzzing of the parsers that read peer or file input (fuzz/, its own
# cargo workspace): tunnel frames and records, Noise handshake messages, config.ini, SCIM answers.
#
#   scripts/fuzz.sh [seconds per target, default 20] [target ...]
#
# Installs cargo-fuzz from crates.io when it is missing (once; about 2.5 min here), builds every
# target (release, AddressSanitizer), then runs the targets one after the other: the machine's
# cores are shared, and a bounded run should cost what it says. The committed seeds are in
# fuzz/seeds/<target> (read only); what libFuzzer learns goes to fuzz/corpus/<target> (ignored by
# git, kept between runs). A crash, a timeout (an input taking over 10 s) or an allocation over
# the target's limit stops the run with exit 1; the input is left in fuzz/artifacts/<target>/
# and must become a regression test in the main crate. The last lines are one summary per target.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PER_TARGET=${1:-20}
shift || true
ALL_TARGETS=(frame_decoder handshake config_ini scim_response)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
CARGO_FUZZ_VERSION=0.13.2

# cargo-fuzz uses nightly-only compiler flags (sanitizers, coverage); RUSTC_BOOTSTRAP lets this
# stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "==> cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# Largest single allocation (MiB) libFuzzer tolerates per target before calling it a crash. The
# frame decoder's inputs are a few KiB, so anything near its 1 MiB small-frame bound is a bug.
malloc_limit() {
  case "$1" in
    frame_decoder) echo 2 ;;
    *) echo 64 ;;
  esac
}

echo "==> cargo fuzz build (${TARGETS[*]})"
BUILD_START=$SECONDS
if [ "$#" -eq 0 ]; then
  cargo fuzz build
else
  for target in "${TARGETS[@]}"; do cargo fuzz build "$target"; done
fi
echo "    built in $((SECONDS - BUILD_START)) s"

SUMMARY=()
for target in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  log=$(mktemp)
  echo "==> fuzz $target for ${PER_TARGET} s"
  status=0
  cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb="$(malloc_limit "$target")" -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [ "$status" -ne 0 ]; then
    mv "$log" "fuzz/artifacts/$target/last-run.log"
    grep -v -E '^ *(#?[0-9]+:? |at )' "fuzz/artifacts/$target/last-run.log" | tail -n 40
    echo "FUZZ FAILURE in $target (exit $status) after ${runs:-?} runs: the input is in"
    echo "fuzz/artifacts/$target/, the whole output in fuzz/artifacts/$target/last-run.log"
    exit 1
  fi
  rm -f "$log"
  SUMMARY+=("$target: ${runs:-?} runs (${speed:-?} exec/s) in ${PER_TARGET} s, 0 crashes")
  echo "    ${SUMMARY[-1]}"
done
echo "==> fuzz summary"
printf '    %s\n' "${SUMMARY[@]}"
