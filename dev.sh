#!/usr/bin/env bash
# Developer entry point (run as root on Debian/Ubuntu):
#   ./dev.sh setup   install the system packages ctguard and its tests need
#   ./dev.sh demo    setup, build, then in a throwaway network namespace with a stateful
#                    firewall: plan, apply the built-in policy with a 5 s timeout, status, no
#                    confirm, automatic rollback, and proof the ruleset is identical again
#   ./dev.sh test    setup, then the whole test suite: the Debian package check, then unit,
#                    golden, CLI, agent and real-kernel tests
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  if [ "$(id -u)" -ne 0 ]; then echo "dev.sh: run as root (namespaces, nft, iptables)" >&2; exit 2; fi
  local missing=()
  while read -r pkg; do
    [ -n "$pkg" ] && ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" && missing+=("$pkg")
  done < integration/packages.txt
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  fi
  modprobe nf_conntrack 2>/dev/null || true
}

demo() {
  setup
  cargo build --release --quiet
  local bin=target/release/ctguard
  # Globals: the EXIT trap runs after this function has returned.
  DEMO_NS="ctg-demo-$$"
  DEMO_TMP=$(mktemp -d /tmp/ctguard-demo.XXXXXX)
  local ns="$DEMO_NS" tmp="$DEMO_TMP"
  local ctg=("$bin" --state-dir "$tmp/state" --run-dir "$tmp/run")
  ip netns add "$ns"
  trap 'ip netns del "$DEMO_NS" 2>/dev/null || true; rm -rf "$DEMO_TMP"' EXIT
  ip netns exec "$ns" nft -f integration/stateful.nft
  local before after
  before=$(ip netns exec "$ns" nft list ruleset)
  echo "== a throwaway namespace $ns with a usual stateful firewall =="
  echo "$before"
  echo
  echo "== ctguard plan --netns $ns (the built-in policy) =="
  "${ctg[@]}" plan --netns "$ns" || true
  echo
  echo "== ctguard apply --netns $ns --timeout 5s =="
  "${ctg[@]}" apply --netns "$ns" --timeout 5s
  echo
  echo "== ctguard status =="
  "${ctg[@]}" status --netns "$ns"
  echo
  echo "== the ruleset while pending: ctguard's table and its accept insertion =="
  ip netns exec "$ns" nft list ruleset
  echo
  echo "== not confirming; waiting for the dead-man timer =="
  for i in 7 6 5 4 3 2 1; do printf '\r%s s ' "$i"; sleep 1; done; echo
  "${ctg[@]}" history --netns "$ns"
  after=$(ip netns exec "$ns" nft list ruleset)
  if [ "$before" = "$after" ]; then
    echo "== rolled back: the ruleset is byte-for-byte the one before apply =="
  else
    echo "== ERROR: the ruleset differs from the one before apply ==" >&2
    diff <(echo "$before") <(echo "$after") >&2 || true
    exit 1
  fi
}

tests() {
  setup
  # The Debian package: built, unpacked into a scratch root, checked in a throwaway namespace.
  integration/deb-test.sh
  # The Ansible collection with real ansible-core (venv from PyPI) against sshd in namespaces;
  # exit 77 = PyPI unreachable: reported as skipped, not passed.
  local rc=0
  integration/ansible/test.sh || rc=$?
  if [ "$rc" -eq 77 ]; then
    echo "dev.sh: Ansible tests SKIPPED (PyPI unreachable)"
  elif [ "$rc" -ne 0 ]; then
    exit "$rc"
  fi
  # The benchmark is built (so it cannot rot) but run only by `cargo bench`.
  cargo build --benches
  # Unit, golden, CLI, agent and real-kernel tests (the kernel ones in throwaway namespaces).
  cargo test --lib --bins --tests -- --test-threads=4
}

case "${1:-}" in
  setup) setup ;;
  demo) demo ;;
  test) tests ;;
  *) echo "usage: $0 setup|demo|test" >&2; exit 2 ;;
esac
