#!/usr/bin/env bash
# Developer entry point (run as root on Debian/Ubuntu):
#   ./dev.sh setup   install the system packages ctguard and its tests need
#   ./dev.sh demo    setup, build, then render + plan the built-in policy against a throwaway
#                    network namespace with a stateful firewall (the host is never touched)
#   ./dev.sh test    setup, then the whole test suite (unit, golden, CLI, real-kernel)
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
  local bin=target/release/ctguard ns="ctg-demo-$$"
  ip netns add "$ns"
  trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
  ip netns exec "$ns" nft -f - <<'NFT'
table inet host {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif "lo" accept
    udp dport 53 ct state new accept
    tcp dport 22 ct state new accept
    reject
  }
}
NFT
  echo "== ctguard render (the built-in policy, pure) =="
  "$bin" render
  echo
  echo "== ctguard plan --check --netns $ns (diff, accept insertions, lint, kernel check) =="
  "$bin" plan --check --netns "$ns"
}

tests() {
  setup
  cargo test --all-targets -- --test-threads=4
}

case "${1:-}" in
  setup) setup ;;
  demo) demo ;;
  test) tests ;;
  *) echo "usage: $0 setup|demo|test" >&2; exit 2 ;;
esac
