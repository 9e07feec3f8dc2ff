#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: ctguard contributors
# Apache License 2.0 (see the ctguard repository)
"""A thin Ansible module around the installed ``ctguard`` CLI (see ``man ctguard`` on the host)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: transaction
short_description: Apply a firewall/conntrack change with ctguard under a dead-man timer
version_added: "0.1.0"
description:
  - Runs the C(ctguard) CLI installed on the target (C(ctguard ... --json)) to apply a
    ctguard policy (NOTRACK for busy UDP/TCP services, the accept rules they need, conntrack
    sysctls) or a whole nft/iptables ruleset file atomically.
  - Every change is a transaction armed with a dead-man timer owned by the ctguard agent on
    the target. Unless it is confirmed in time, the agent rolls it back to the exact prior state.
  - By default the confirmation must come from a B(new) SSH connection (the agent checks the
    confirming process's sshd ancestry), so a change that cuts the connection Ansible used
    cannot be confirmed and reverts by itself.
  - I(state=committed) is handled by the action plugin of the same name; it applies, resets the
    connection, opens a new one and confirms over it. When it cannot reconnect it waits past
    the deadline and fails with a message saying the change was rolled back.
  - I(state=pending) applies and leaves the transaction pending; confirm it in a later task
    with I(state=confirmed) after C(meta reset_connection) and C(wait_for_connection) (see the
    examples).
  - Check mode runs C(ctguard plan) and changes nothing. Diff mode returns the rules and
    sysctls before and after.
  - The module never runs a shell on the target; arguments are passed as a list.
author:
  - ctguard maintainers (@ctguard)
options:
  state:
    description:
      - C(committed) applies and confirms from a new connection (action plugin).
      - C(pending) applies and leaves the transaction pending; returns I(txid) and I(deadline).
      - C(confirmed) confirms I(txid), or the single pending transaction.
      - C(rolled_back) rolls back I(txid), or the single pending transaction, now.
    type: str
    choices: [committed, pending, confirmed, rolled_back]
    default: committed
  policy:
    description:
      - A ctguard policy as a dictionary. Keys are C(backend) (C(auto), C(nft), C(iptables-nft),
        C(iptables-legacy)), C(persist) (bool), C(notrack) (a list of entries with
        C(protocols) and C(ports), both required, and C(sources), C(interfaces),
        C(local_only), C(accept_untracked), C(flush_existing)) and C(sysctl)
        (C(net.netfilter.*) keys, integers or C(auto)). Unknown fields are refused by ctguard;
        C(man ctguard) on the host (section POLICY) describes each key.
      - Written to a temporary C(.json) file on the target.
      - When none of I(policy), I(policy_file) and I(ruleset) is given, ctguard applies its
        built-in policy (NOTRACK for UDP and TCP port 53).
    type: dict
  policy_file:
    description:
      - Path on the target of a policy file (TOML, or JSON when it ends in C(.json)).
    type: path
  ruleset:
    description:
      - Path on the target of an nft script or an iptables-restore dump, for a ruleset transaction
        whose rollback restores the whole prior firewall.
    type: path
  netns:
    description:
      - Target network namespace on the host (a name under C(/run/netns) or a path). Default is
        the namespace ctguard runs in.
    type: str
  timeout:
    description:
      - Dead-man timeout, e.g. C(90), C(90s), C(5m), C(1h).
    type: str
    default: 60s
  probes:
    description:
      - Connectivity probes run by the agent in the target (C(tcp:HOST:PORT),
        C(udp-dns:HOST:PORT:NAME), C(icmp:HOST), C(exec:CMD ARGS)). Any failure rolls back.
    type: list
    elements: str
    default: []
  probe_interval:
    description:
      - Repeat the probes at this interval until the deadline.
    type: str
  auto_confirm:
    description:
      - Commit as soon as the first probe round passes (requires I(probes)).
    type: bool
    default: false
  allow_same_connection:
    description:
      - Accept a confirmation over the connection that applied (turns the new-connection proof off).
    type: bool
    default: false
  force:
    description:
      - Apply despite lint errors (for instance a ruleset that would lock SSH out).
    type: bool
    default: false
  persist:
    description:
      - Once committed, make the change survive a reboot.
    type: bool
    default: false
  comment:
    description:
      - Why the change is made; recorded with the transaction and shown by C(ctguard status),
        C(history) and C(show) (one line, at most 200 characters).
    type: str
  state_dir:
    description:
      - ctguard's journal directory (C(--state-dir)); default C(/var/lib/ctguard).
    type: path
  run_dir:
    description:
      - ctguard's agent socket directory (C(--run-dir)); default C(/run/ctguard).
    type: path
  txid:
    description:
      - Transaction id for I(state=confirmed) and I(state=rolled_back). Default is the single
        pending transaction.
    type: str
  executable:
    description:
      - The ctguard binary on the target (a name looked up on C(PATH), or a path).
    type: str
    default: ctguard
notes:
  - Needs root on the target (C(become) works; the new-connection proof follows the sshd
    ancestry, not C(SSH_CONNECTION)).
  - Exit codes of ctguard are mapped to failure messages; the raw code is returned as I(rc).
  - C(man ctguard) on the target documents the policy keys (POLICY), the dead-man timer and
    confirmation (SAFETY MODEL), the exit codes (EXIT STATUS) and the C(--json) output.
  - "With a I(ruleset), check mode cannot predict the result without applying it: it reports
    C(changed=true) and a warning."
attributes:
  check_mode:
    support: full
    description: Runs C(ctguard plan); nothing changes.
  diff_mode:
    support: full
    description: Before and after of ctguard's rules, insertions and sysctls.
"""

EXAMPLES = r"""
- name: NOTRACK DNS, confirmed from a new connection (rolled back if it cuts us off)
  ctguard.firewall.transaction:
    state: committed
    timeout: 60s
    policy:
      notrack:
        - protocols: [udp, tcp]
          ports: [53]
      sysctl:
        net.netfilter.nf_conntrack_max: auto

- name: Two-task pattern, step 1 - apply and leave pending
  ctguard.firewall.transaction:
    state: pending
    timeout: 120s
    policy_file: /etc/ctguard/policy.toml
  register: txn

- name: Drop the connection the change was made over
  ansible.builtin.meta: reset_connection

- name: Wait until a new connection works
  ansible.builtin.wait_for_connection:
    timeout: 60

- name: Two-task pattern, step 2 - confirm over the new connection
  ctguard.firewall.transaction:
    state: confirmed
    txid: "{{ txn.txid }}"
  when: txn.txid is defined and txn.txid

- name: Roll out a whole nft ruleset
  ctguard.firewall.transaction:
    state: committed
    ruleset: /etc/nftables.d/candidate.nft
    timeout: 30s
    probes:
      - tcp:192.0.2.10:443

- name: Cancel a pending transaction now
  ctguard.firewall.transaction:
    state: rolled_back
    txid: "{{ txn.txid }}"
"""

RETURN = r"""
changed:
  description: Whether the firewall or sysctls changed (in check mode, whether they would).
  returned: always
  type: bool
txid:
  description: The transaction id (none when nothing had to change).
  returned: when a transaction was started or addressed
  type: str
  sample: "20261204-031331-7199"
deadline:
  description: When the agent rolls the transaction back unless confirmed (UTC, RFC 3339).
  returned: when a transaction is pending
  type: str
  sample: "2026-11-23T16:49:03Z"
seconds_left:
  description: Seconds until the deadline when the apply returned.
  returned: when a transaction is pending
  type: int
outcome:
  description: C(pending), C(committed), C(rolled back ...), C(unchanged) or C(would change).
  returned: always
  type: str
  sample: committed
confirm:
  description: The command that confirms the pending transaction (from a new connection).
  returned: when a transaction is pending
  type: str
needs_new_connection:
  description: Whether the agent requires the confirmation to come from a new connection.
  returned: when a transaction is pending
  type: bool
noop:
  description: For a ruleset, true when applying it changed no listing.
  returned: for ruleset transactions
  type: bool
plan:
  description: The output of C(ctguard plan --json) (policy transactions).
  returned: for policy transactions
  type: dict
findings:
  description: Lint findings of the plan.
  returned: for policy transactions
  type: list
  elements: dict
warnings:
  description: Warnings reported by ctguard (also shown as Ansible warnings).
  returned: when there are any
  type: list
  elements: str
diff:
  description: Before and after of ctguard's objects, insertions and sysctls (diff mode).
  returned: in diff mode
  type: dict
rc:
  description: The exit code of the last ctguard command.
  returned: always
  type: int
cmd:
  description: The last ctguard command run (a list, never a shell string).
  returned: always
  type: list
  elements: str
"""

import json
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_native

# ctguard's exit codes (man ctguard, EXIT STATUS).
EXIT_MESSAGES = {
    1: "ctguard failed with an internal error",
    2: "bad input or failed precondition; nothing changed",
    3: "refused by the kernel, a backend, a check or a lint error; nothing changed "
       "(force: true applies despite lint errors)",
    4: "another transaction is pending on this target, or the lock is held",
    5: "the transaction was rolled back instead of doing what was asked",
    6: "the ctguard agent is unreachable",
    7: "ROLLBACK FAILED: the firewall state is unknown, an operator is needed",
    8: "confirmation refused: it must come from a NEW connection, not the one that applied",
}


class Ctguard(object):
    def __init__(self, module):
        self.module = module
        p = module.params
        exe = p["executable"]
        if "/" not in exe:
            exe = module.get_bin_path(exe, required=True, opt_dirs=["/usr/local/sbin", "/usr/sbin", "/sbin"])
        self.base = [exe, "--json"]
        for flag, key in (("--state-dir", "state_dir"), ("--run-dir", "run_dir"), ("--netns", "netns")):
            if p[key]:
                self.base += [flag, p[key]]
        self.last_cmd = None
        self.last_rc = None
        # The `error` of the last envelope.
        self.last_error = None
        # The temp file the `policy` dict was written to (named `policy` in messages).
        self.policy_tmp = None

    def run(self, args):
        cmd = self.base + list(args)
        self.last_cmd = cmd
        rc, out, err = self.module.run_command(cmd, check_rc=False, environ_update={"LC_ALL": "C"})
        self.last_rc = rc
        # Every verb prints one envelope {"exit", "error", "data"} under --json, on success and
        # on failure: `data` is what the verb reports (null when it has nothing), `error` the
        # failure's message (null on success).
        data = None
        self.last_error = None
        if out.strip():
            try:
                envelope = json.loads(out)
            except ValueError:
                envelope = None
            if isinstance(envelope, dict):
                data = envelope.get("data")
                self.last_error = envelope.get("error")
        return rc, data, out, err

    def fail(self, what, rc, data, out, err, **extra):
        msg = EXIT_MESSAGES.get(rc, "ctguard exited with code %s" % rc)
        detail = to_native(self.last_error) if self.last_error else ""
        errlines = [line.replace("ctguard: error: ", "") for line in (err or "").splitlines() if line.strip()]
        errlines = [line for line in errlines[-10:] if line not in detail]
        if errlines:
            detail = (detail + "; " if detail else "") + "; ".join(errlines)
        if self.policy_tmp:
            detail = detail.replace("policy %s: " % self.policy_tmp, "policy: ").replace(self.policy_tmp, "policy")
        full = "%s: %s" % (what, msg)
        if detail:
            full += ": " + detail
        extra.setdefault("changed", False)
        self.module.fail_json(msg=full, rc=rc, cmd=self.last_cmd, stdout=out, stderr=err, **extra)


def policy_source(module, ctg):
    """The policy argument for plan/apply: a path on the target, or None (built-in)."""
    p = module.params
    if p["policy"] is not None:
        fd, path = tempfile.mkstemp(prefix="ctguard-policy-", suffix=".json", dir=module.tmpdir)
        with os.fdopen(fd, "w") as f:
            json.dump(p["policy"], f)
        os.chmod(path, 0o600)
        ctg.policy_tmp = path
        return path
    if p["policy_file"] is not None:
        return p["policy_file"]
    return None


def plan_diff(plan):
    """Before/after text of ctguard's objects, insertions and sysctls from `plan --json`."""
    before, after = [], []
    objects = plan.get("objects") or {}
    label = "table inet ctguard" if plan.get("backend") == "nft" else "ctguard %s objects" % plan.get("backend")
    before.append("# %s" % label)
    after.append("# %s" % label)
    before += objects.get("current") or []
    after += objects.get("desired") or []
    insertions = plan.get("insertions") or []
    if insertions:
        after.append("# accept insertions (accept_untracked)")
        for ins in insertions:
            after.append("%s: %s" % (ins.get("chain", "?"), json.dumps(ins.get("rule"), sort_keys=True)))
    sysctls = plan.get("sysctl") or []
    if sysctls:
        before.append("# sysctl")
        after.append("# sysctl")
        for s in sysctls:
            before.append("%s = %s" % (s.get("key"), s.get("old")))
            new = s.get("old") if (s.get("skipped") or s.get("unchanged")) else s.get("new")
            after.append("%s = %s" % (s.get("key"), new))
    return {
        "before": "\n".join(before) + "\n",
        "after": "\n".join(after) + "\n",
        "before_header": "live state",
        "after_header": "after apply",
    }


def show_diff(show):
    """Before/after from `show TXID --json` (`diff` holds the changed listing lines)."""
    lines = show.get("diff") or []
    before = [line[2:] for line in lines if line.startswith("- ")]
    after = [line[2:] for line in lines if line.startswith("+ ")]
    return {"before": "\n".join(before) + ("\n" if before else ""),
            "after": "\n".join(after) + ("\n" if after else ""),
            "before_header": "before", "after_header": "after"}


def do_plan(module, ctg, policy):
    args = ["plan"]
    if policy:
        args.append(policy)
    if module.check_mode:
        args.append("--check")
    rc, data, out, err = ctg.run(args)
    if rc not in (0, 3) or not isinstance(data, dict):
        ctg.fail("plan", rc, data, out, err)
    if rc == 3 and not module.params["force"]:
        ctg.fail("plan", rc, data, out, err, plan=data, findings=data.get("findings") or [])
    return data


def add_warnings(module, warnings):
    """ctguard's warnings become Ansible warnings (returned as `warnings`)."""
    seen = set()
    for w in warnings or []:
        w = to_native(w) if w else ""
        if w and w not in seen:
            seen.add(w)
            module.warn(w)


def apply_pending(module, ctg):
    p = module.params
    result = {"changed": False}
    policy = None
    if p["ruleset"] is None:
        policy = policy_source(module, ctg)
        plan = do_plan(module, ctg, policy)
        result["plan"] = plan
        result["findings"] = plan.get("findings") or []
        add_warnings(module, [f.get("message") for f in result["findings"]
                              if f.get("severity") == "warning"])
        if module._diff:
            result["diff"] = plan_diff(plan)
        if not plan.get("changed"):
            result.update(outcome="unchanged", rc=ctg.last_rc, cmd=ctg.last_cmd)
            module.exit_json(**result)
        if module.check_mode:
            result.update(changed=True, outcome="would change", rc=ctg.last_rc, cmd=ctg.last_cmd)
            module.exit_json(**result)
    elif module.check_mode:
        if not os.path.isfile(p["ruleset"]):
            module.fail_json(msg="ruleset: %s: no such file on the target" % p["ruleset"], changed=False)
        module.warn("ruleset: check mode cannot tell whether applying %s changes anything" % p["ruleset"])
        module.exit_json(changed=True, outcome="would change", rc=0, cmd=[])

    args = ["apply"]
    if p["ruleset"] is not None:
        args += ["--ruleset", p["ruleset"]]
    elif policy:
        args.append(policy)
    args += ["--timeout", p["timeout"]]
    for probe in p["probes"] or []:
        args += ["--probe", probe]
    if p["probe_interval"]:
        args += ["--probe-interval", p["probe_interval"]]
    for flag in ("auto_confirm", "allow_same_connection", "force", "persist"):
        if p[flag]:
            args.append("--" + flag.replace("_", "-"))
    if p["comment"]:
        args += ["--comment", p["comment"]]
    rc, data, out, err = ctg.run(args)
    d = data if isinstance(data, dict) else {}
    if rc != 0:
        extra = {}
        if d.get("txid"):
            extra["txid"] = d["txid"]
        if rc == 5:
            extra["outcome"] = "rolled back"
        ctg.fail("apply", rc, data, out, err, **extra)
    result.update(
        changed=True,
        txid=d.get("txid"),
        deadline=d.get("deadline"),
        seconds_left=d.get("seconds_left"),
        confirm=d.get("confirm"),
        needs_new_connection=d.get("needs_new_connection"),
        outcome=(d.get("state") or "PENDING").lower(),
        probes=d.get("probes"),
        rc=rc,
        cmd=ctg.last_cmd,
    )
    add_warnings(module, d.get("warnings"))
    if p["ruleset"] is not None and d.get("txid"):
        rc2, show, _out, _err = ctg.run(["show", d["txid"]])
        if rc2 == 0 and isinstance(show, dict):
            changed_lines = show.get("diff") or []
            result["noop"] = not changed_lines
            result["changed"] = bool(changed_lines)
            if module._diff:
                result["diff"] = show_diff(show)
        ctg.last_rc, ctg.last_cmd = rc, result["cmd"]
    module.exit_json(**result)


def confirm_or_rollback(module, ctg, verb):
    p = module.params
    txid = p["txid"]
    if module.check_mode:
        rc, data, out, err = ctg.run(["status"])
        if rc != 0:
            ctg.fail("status", rc, data, out, err)
        pending = [t for t in (data or {}).get("pending") or [] if not txid or t.get("id") == txid]
        if not pending and txid:
            rc, show, out, err = ctg.run(["show", txid])
            if rc != 0:
                ctg.fail("show", rc, show, out, err)
            module.exit_json(changed=False, txid=txid, outcome=show.get("outcome"), rc=rc, cmd=ctg.last_cmd)
        module.exit_json(changed=bool(pending), txid=txid or (pending[0]["id"] if pending else None),
                         outcome="would be %s" % ("committed" if verb == "confirm" else "rolled back"),
                         rc=rc, cmd=ctg.last_cmd)
    args = [verb] + ([txid] if txid else [])
    rc, data, out, err = ctg.run(args)
    d = data if isinstance(data, dict) else {}
    if rc != 0:
        extra = {"txid": txid} if txid else {}
        if rc == 5:
            extra["outcome"] = "rolled back"
        what = "confirm" if verb == "confirm" else "rollback"
        ctg.fail(what, rc, data, out, err, **extra)
    # "already committed" / "already rolled back" answers change nothing.
    already = bool(d.get("note")) and "already" in to_native(d.get("note"))
    result = dict(changed=not already, txid=d.get("txid") or txid, rc=rc, cmd=ctg.last_cmd,
                  outcome="committed" if verb == "confirm" else "rolled back")
    if d.get("note"):
        result["note"] = d["note"]
    if d.get("persisted") is not None:
        result["persisted"] = d["persisted"]
    if result["txid"]:
        rc2, show, _out, _err = ctg.run(["show", result["txid"]])
        if rc2 == 0 and isinstance(show, dict):
            result["outcome"] = show.get("outcome") or result["outcome"]
            if module._diff and verb == "rollback" and result["changed"]:
                diff = show_diff(show)
                result["diff"] = {"before": diff["after"], "after": diff["before"],
                                  "before_header": "pending", "after_header": "rolled back"}
        ctg.last_rc, ctg.last_cmd = rc, result["cmd"]
    module.exit_json(**result)


def argument_spec():
    return dict(
        state=dict(type="str", default="committed", choices=["committed", "pending", "confirmed", "rolled_back"]),
        policy=dict(type="dict"),
        policy_file=dict(type="path"),
        ruleset=dict(type="path"),
        netns=dict(type="str"),
        timeout=dict(type="str", default="60s"),
        probes=dict(type="list", elements="str", default=[]),
        probe_interval=dict(type="str"),
        auto_confirm=dict(type="bool", default=False),
        allow_same_connection=dict(type="bool", default=False),
        force=dict(type="bool", default=False),
        persist=dict(type="bool", default=False),
        comment=dict(type="str"),
        state_dir=dict(type="path"),
        run_dir=dict(type="path"),
        txid=dict(type="str"),
        executable=dict(type="str", default="ctguard"),
    )


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        mutually_exclusive=[["policy", "policy_file", "ruleset"]],
        required_if=[["auto_confirm", True, ["probes"]]],
        supports_check_mode=True,
    )
    state = module.params["state"]
    ctg = Ctguard(module)
    if state == "committed":
        # The action plugin turns `committed` into `pending` + reset + `confirmed`; reaching this
        # means the module ran without it (e.g. `ansible -m` with another plugin path).
        if module.check_mode:
            apply_pending(module, ctg)
        module.fail_json(msg="state=committed needs the ctguard.firewall.transaction action plugin "
                             "(it confirms over a new connection); use state=pending and state=confirmed")
    if state == "pending":
        apply_pending(module, ctg)
    elif state == "confirmed":
        confirm_or_rollback(module, ctg, "confirm")
    else:
        confirm_or_rollback(module, ctg, "rollback")


if __name__ == "__main__":
    main()
