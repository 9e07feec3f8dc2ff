#!/usr/bin/env bash
# Runs the README's cargo test command N times in a row (default 20) in a clean clone of HEAD,
# stopping at the first failure: the flakiness check of issue 10. Run as root.
#   integration/repeat.sh [N] [extra cargo test filter args...]
set -euo pipefail
n=${1:-20}
shift || true
src=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d /tmp/ctguard-repeat.XXXXXX)
git clone -q "$src" "$dir/repo"
cd "$dir/repo"
cargo test --no-run --lib --bins --tests >/dev/null 2>&1
start=$(date +%s)
for i in $(seq 1 "$n"); do
  t0=$(date +%s)
  if ! cargo test --lib --bins --tests -- --test-threads=4 "$@" >"$dir/run-$i.log" 2>&1; then
    echo "repeat: run $i of $n FAILED after $(( $(date +%s) - t0 )) s; log: $dir/run-$i.log"
    grep -E "^test .* FAILED|panicked at" "$dir/run-$i.log" | head -20
    exit 1
  fi
  passed=$(grep -Eo "[0-9]+ passed" "$dir/run-$i.log" | awk '{s+=$1} END {print s}')
  echo "repeat: run $i of $n green ($passed passed, $(( $(date +%s) - t0 )) s)"
done
echo "repeat: $n of $n green in $(( $(date +%s) - start )) s (commit $(git rev-parse --short HEAD))"
rm -rf "$dir"
