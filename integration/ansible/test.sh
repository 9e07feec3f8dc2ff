#!/bin/bash
# The Ansible collection's tests (DESIGN §8), as CI runs them. Needs root (namespaces, sshd in
# a test namespace), python3 with venv, openssh-server/client, and PyPI for ansible-core.
#
#   integration/ansible/test.sh [extra cargo test filter args…]
#
# 1. A virtualenv with ansible-core (pinned) at target/ansible-venv, reused while its marker
#    matches the pin (CTGUARD_ANSIBLE_VENV overrides the path; without a target/ directory it
#    goes to a temp dir). When PyPI cannot be reached the Ansible tests are SKIPPED: the script
#    says so and exits 77 (the automake/CI "skipped" code); nothing is reported as passed.
# 2. Static checks: py_compile of the plugins, `ansible-doc` renders the module, the module's
#    argument_spec agrees with its DOCUMENTATION, EXAMPLES and RETURN parse.
# 3. The end-to-end tests in integration/kernel/ansible.rs (`#[ignore]`d in a plain
#    `cargo test`, so they count as ignored there, never as passed), run with --ignored.
set -euo pipefail

ANSIBLE_CORE_PIN="ansible-core==2.17.14"   # controller Python 3.10-3.12, targets 3.7-3.12
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
collections="$here/collections"
t0=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "test.sh: needs root (network namespaces, sshd in a test namespace)" >&2
    exit 1
fi

python=/usr/bin/python3
[ -x "$python" ] || python="$(command -v python3)"

if [ -n "${CTGUARD_ANSIBLE_VENV:-}" ]; then
    venv="$CTGUARD_ANSIBLE_VENV"
elif [ -d "$repo/target" ]; then
    venv="$repo/target/ansible-venv"
else
    venv="$(mktemp -d /tmp/ctguard-ansible-venv.XXXXXX)/venv"
fi
marker="$venv/.ctguard-pin"

make_venv() {
    # Under a lock: concurrent runs share target/ (a venv cannot be moved once made).
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    flock 9
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$ANSIBLE_CORE_PIN" ] && [ -x "$venv/bin/ansible-playbook" ]; then
        echo "test.sh: reusing $venv ($ANSIBLE_CORE_PIN)"
        return 0
    fi
    rm -rf "$venv"
    local s=$(date +%s)
    "$python" -m venv "$venv"
    if ! "$venv/bin/pip" install --disable-pip-version-check -q --timeout 30 "$ANSIBLE_CORE_PIN"; then
        rm -rf "$venv"
        return 1
    fi
    echo "$ANSIBLE_CORE_PIN" >"$marker"
    echo "test.sh: made $venv with $ANSIBLE_CORE_PIN in $(( $(date +%s) - s )) s"
}

pypi_reachable() {
    "$python" - <<'PYEOF'
import os, sys, urllib.request
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
try:
    urllib.request.urlopen(index + "/ansible-core/", timeout=15).read(1)
except Exception as e:
    print("test.sh: %s: %s" % (index, e), file=sys.stderr)
    sys.exit(1)
PYEOF
}

if ! make_venv; then
    if pypi_reachable; then
        echo "test.sh: FAILED: PyPI answers but pip could not install $ANSIBLE_CORE_PIN" >&2
        exit 1
    fi
    echo "SKIPPED: the Ansible tests: PyPI is unreachable, so pip could not install $ANSIBLE_CORE_PIN" >&2
    exit 77
fi
export CTGUARD_ANSIBLE_VENV="$venv"
export ANSIBLE_COLLECTIONS_PATH="$collections"
export PYTHONDONTWRITEBYTECODE=1
export ANSIBLE_HOME="$(mktemp -d /tmp/ctguard-ansible-home.XXXXXX)"
trap 'rm -rf "$ANSIBLE_HOME"' EXIT

# --- static checks ---------------------------------------------------------------------------
plugins="$collections/ansible_collections/ctguard/firewall/plugins"
echo "test.sh: py_compile"
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" - "$plugins"/modules/transaction.py "$plugins"/action/transaction.py <<'EOF'
import os, sys, py_compile, tempfile
with tempfile.TemporaryDirectory() as d:
    for f in sys.argv[1:]:
        # compiled into a throw-away dir: no __pycache__ in the collection
        py_compile.compile(f, cfile=os.path.join(d, "x.pyc"), doraise=True)
        print("  ok", f)
EOF

echo "test.sh: ansible-doc"
doc="$("$venv/bin/ansible-doc" ctguard.firewall.transaction)"
for want in "ctguard.firewall.transaction" "committed" "allow_same_connection" "EXAMPLES" "RETURN VALUES"; do
    grep -q -- "$want" <<<"$doc" || { echo "ansible-doc output lacks '$want':"; echo "$doc" | head -40; exit 1; }
done
"$venv/bin/ansible-doc" --json ctguard.firewall.transaction >"$ANSIBLE_HOME/doc.json"

echo "test.sh: argument_spec <-> DOCUMENTATION"
"$venv/bin/python" - "$plugins/modules/transaction.py" "$ANSIBLE_HOME/doc.json" <<'EOF'
import importlib.util, json, sys, yaml
path, docjson = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("ctg_transaction", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
doc = yaml.safe_load(mod.DOCUMENTATION)
yaml.safe_load(mod.EXAMPLES)
yaml.safe_load(mod.RETURN)
rendered = json.load(open(docjson))["ctguard.firewall.transaction"]["doc"]["options"]
argspec = mod.argument_spec()
opts = doc["options"]
problems = []
# DESIGN §8's parameters, exactly.
design = {"policy", "policy_file", "ruleset", "netns", "timeout", "probes", "probe_interval", "auto_confirm",
          "allow_same_connection", "force", "persist", "comment", "state_dir", "run_dir", "txid", "state", "executable"}
if set(argspec) != design:
    problems.append("argument_spec %s != DESIGN §8 %s" % (sorted(argspec), sorted(design)))
if set(argspec) != set(opts):
    problems.append("argument_spec and DOCUMENTATION differ: %s" % sorted(set(argspec) ^ set(opts)))
if set(rendered) != set(opts):
    problems.append("ansible-doc renders other options: %s" % sorted(set(rendered) ^ set(opts)))
for name, a in argspec.items():
    d = opts.get(name, {})
    for key in ("type", "choices", "elements", "required"):
        av, dv = a.get(key), d.get(key)
        if key == "type":
            av = av or "str"; dv = dv or "str"
        if key == "required":
            av = bool(av); dv = bool(dv)
        if av != dv:
            problems.append("%s.%s: argument_spec %r, DOCUMENTATION %r" % (name, key, av, dv))
    if a.get("default") != d.get("default"):
        problems.append("%s.default: argument_spec %r, DOCUMENTATION %r" % (name, a.get("default"), d.get("default")))
    if not d.get("description"):
        problems.append("%s: no description" % name)
if problems:
    print("\n".join("  " + p for p in problems))
    sys.exit(1)
print("  ok: %d options agree" % len(argspec))
EOF

# --- end to end ------------------------------------------------------------------------------
echo "test.sh: building"
cd "$repo"
cargo build --quiet --tests --test kernel
echo "test.sh: end-to-end (ansible-playbook in cli, sshd + ctguard in srv)"
s=$(date +%s)
# Arguments replace the default filter: every test in kernel/ansible.rs.
[ $# -gt 0 ] || set -- ansible::
cargo test --quiet --test kernel -- --ignored --nocapture "$@"
echo "test.sh: end-to-end tests took $(( $(date +%s) - s )) s; everything $(( $(date +%s) - t0 )) s"
