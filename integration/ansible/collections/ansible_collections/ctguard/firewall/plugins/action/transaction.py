# -*- coding: utf-8 -*-
# Copyright: ctguard contributors
# Apache License 2.0 (see the ctguard repository)
"""Action plugin for ctguard.firewall.transaction.

`state: committed` = apply (module, `state: pending`) -> reset the connection -> a NEW
connection -> confirm over it (module, `state: confirmed`). If the new connection cannot be
made (the change cut the host off), nothing can confirm: the agent on the target rolls back at
the deadline. The plugin waits past it, reconnects, checks the journal and fails with a
message saying the change was rolled back. Every other state goes straight to the module.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import re
import shlex
import time

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_native
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

MODULE = "ctguard.firewall.transaction"
# How long after the deadline the plugin waits before looking (the agent's rollback takes a
# moment), and how long it keeps trying to reconnect after that.
GRACE_SECS = 3
RECONNECT_SECS = 90
RETRY_SLEEP = 1


def parse_duration(text):
    """ctguard durations: 90, 90s, 5m, 1h -> seconds (None when it cannot be parsed)."""
    m = re.match(r"^\s*(\d+)\s*([smh]?)\s*$", to_native(text or ""))
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def _module(self, args, task_vars):
        """Runs the module once; a lost connection becomes {'unreachable': True}."""
        try:
            return self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
        except AnsibleConnectionFailure as e:
            return {"unreachable": True, "msg": to_native(e)}

    def _reset(self):
        try:
            self._connection.reset()
        except Exception as e:  # pylint: disable=broad-exception-caught  # a dead control master must not stop the confirm
            display.vvv("ctguard: connection reset failed: %s" % to_native(e))

    def _no_retries(self):
        # A lost apply must never be run again by the connection's own retries.
        try:
            self._connection.set_option("reconnection_retries", 0)
        except (AnsibleError, KeyError, AttributeError):
            pass

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super(ActionModule, self).run(tmp, task_vars)
        args = dict(self._task.args)
        state = args.get("state") or "committed"
        if state != "committed" or self._task.check_mode:
            result.update(self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars))
            return result

        timeout = parse_duration(args.get("timeout", "60s"))
        if timeout is None:
            result.update(failed=True, changed=False, msg="timeout: %r is not a duration (90, 90s, 5m, 1h)" % args.get("timeout"))
            return result

        # 1. Apply and leave pending.
        self._no_retries()
        started = time.monotonic()
        applied = self._module(dict(args, state="pending"), task_vars)
        if applied.get("failed") or (not applied.get("unreachable") and not applied.get("txid")):
            # Refused (nothing changed), rolled back by a probe, or nothing to change.
            result.update(applied)
            return result
        txid = applied.get("txid")
        if applied.get("outcome") == "committed":
            result.update(applied)  # auto_confirm: committed by the probes
            return result
        if applied.get("unreachable"):
            display.warning("ctguard: the connection was lost while applying (%s); waiting for the agent's deadline"
                            % applied.get("msg"))
            return self._wait_rolled_back(result, args, task_vars, txid, started + timeout,
                                          "the connection was lost during the apply")
        deadline = time.monotonic() + float(applied.get("seconds_left") or timeout)

        # 2. Drop the connection that applied; 3. confirm over a new one.
        self._reset()
        reason = None
        while True:
            confirmed = self._module(dict(args, state="confirmed", txid=txid), task_vars)
            if not confirmed.get("unreachable"):
                break
            reason = "no new connection could be made after the apply: %s" % confirmed.get("msg")
            self._reset()
            if time.monotonic() + RETRY_SLEEP >= deadline - 1:
                return self._wait_rolled_back(result, args, task_vars, txid, deadline, reason)
            time.sleep(RETRY_SLEEP)

        if confirmed.get("failed"):
            rc = confirmed.get("rc")
            if rc == 8:
                # Refused: not a new connection. Nothing else can confirm it; undo it now.
                rolled = self._module(dict(args, state="rolled_back", txid=txid), task_vars)
                how = "rolled back now" if not rolled.get("failed") and not rolled.get("unreachable") else \
                    "left to the agent's deadline to be rolled back (the rollback request failed: %s)" % rolled.get("msg")
                result.update(confirmed)
                result.update(failed=True, changed=False, txid=txid,
                              outcome="rolled back" if "rolled back now" == how else "pending",
                              msg="%s; transaction %s %s" % (confirmed.get("msg"), txid, how))
                return result
            if rc == 5:
                result.update(confirmed)
                why = (reason + "; ") if reason else ""
                result.update(failed=True, changed=False, txid=txid, outcome="rolled back",
                              msg="%stransaction %s was rolled back by the agent's dead-man timer before a new "
                                  "connection could confirm it: %s"
                              % (why, txid, confirmed.get("msg")))
                return result
            result.update(confirmed)
            result.update(txid=txid, msg="confirm of %s failed (it is rolled back at its deadline unless "
                                         "confirmed): %s" % (txid, confirmed.get("msg")))
            return result

        # Committed.
        result.update(applied)
        result.update(
            changed=bool(applied.get("changed")),
            txid=txid,
            outcome=confirmed.get("outcome") or "committed",
            confirmed_over_new_connection=True,
        )
        for k in ("persisted", "note"):
            if k in confirmed:
                result[k] = confirmed[k]
        result.pop("failed", None)
        return result

    # -----------------------------------------------------------------------------------------

    def _remote_ctguard(self, args, verb):
        exe = args.get("executable") or "ctguard"
        cmd = [exe, "--json"]
        for flag, key in (("--state-dir", "state_dir"), ("--run-dir", "run_dir"), ("--netns", "netns")):
            if args.get(key):
                cmd += [flag, args[key]]
        cmd += verb
        res = self._low_level_execute_command(" ".join(shlex.quote(to_native(c)) for c in cmd), sudoable=True)
        # Every verb prints one envelope {"exit", "error", "data"}; what it reports is `data`
        # (null when it failed).
        try:
            envelope = json.loads(res.get("stdout") or "")
        except ValueError:
            return None
        return envelope.get("data") if isinstance(envelope, dict) else None

    def _wait_rolled_back(self, result, args, task_vars, txid, deadline, reason):
        """Waits past the deadline, reconnects and reports what the agent did."""
        left = deadline - time.monotonic()
        display.display("ctguard: %s; waiting %.0f s for the dead-man timer (transaction %s)"
                        % (reason, max(left, 0) + GRACE_SECS, txid or "unknown"))
        if left > 0:
            time.sleep(left)
        time.sleep(GRACE_SECS)
        give_up = time.monotonic() + RECONNECT_SECS
        found = None
        last_error = None
        while True:
            self._reset()
            try:
                if txid:
                    found = self._remote_ctguard(args, ["show", txid])
                else:
                    hist = self._remote_ctguard(args, ["history"]) or {}
                    txs = hist.get("transactions") or []
                    found = txs[-1] if txs else None
                if found is not None or not txid:
                    break
                last_error = "no answer from ctguard show %s" % txid
            except AnsibleConnectionFailure as e:
                last_error = to_native(e)
            if time.monotonic() >= give_up:
                break
            time.sleep(RETRY_SLEEP * 2)
        result.update(failed=True, changed=False, txid=txid or (found or {}).get("id"))
        if found is None and last_error is not None:
            result.update(
                unreachable_after_deadline=True,
                outcome="unknown",
                msg="%s; the change cannot have been confirmed, so the agent's dead-man timer should have rolled "
                    "it back, but the host is still unreachable %d s after the deadline (%s)"
                    % (reason, RECONNECT_SECS, last_error))
            return result
        state = (found or {}).get("state")
        outcome = (found or {}).get("outcome") or "unknown"
        result["outcome"] = outcome
        if state in ("ROLLED_BACK",) or outcome.startswith("rolled back"):
            result["msg"] = ("%s; transaction %s was rolled back by the agent's dead-man timer (%s); "
                             "the host is reachable again with its previous firewall"
                             % (reason, result["txid"], outcome))
        elif state == "ROLLBACK_FAILED":
            result["msg"] = "%s; transaction %s: ROLLBACK FAILED (%s): operator needed" % (reason, result["txid"], outcome)
        else:
            result["msg"] = ("%s; transaction %s was not rolled back as expected: state %s (%s)"
                             % (reason, result["txid"], state, outcome))
        return result
