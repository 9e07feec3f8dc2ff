# -*- coding: utf-8 -*-
# Test-only stdout callback: one JSON document with every task's per-host result, shaped like
# ansible.posix.json (ansible-core ships no JSON callback; this avoids a Galaxy download).
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: ctguard_json
type: stdout
short_description: the play results as one JSON document (tests)
description:
  - Prints {"plays":[{"play":{...},"tasks":[{"task":{"name":...},"hosts":{HOST:RESULT}}]}],"stats":{...}}.
"""

import json

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "ctguard_json"

    def __init__(self, display=None):
        super(CallbackModule, self).__init__(display)
        self.results = []

    def v2_playbook_on_play_start(self, play):
        self.results.append({"play": {"name": play.get_name(), "id": str(play._uuid)}, "tasks": []})

    def _task_start(self, task):
        self.results[-1]["tasks"].append({"task": {"name": task.get_name(), "id": str(task._uuid)}, "hosts": {}})

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task_start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._task_start(task)

    def _record(self, result, **extra):
        host = result._host.get_name()
        r = dict(result._result)
        r.update(extra)
        # Tasks of later serial batches start again: find this task's entry.
        for t in reversed(self.results[-1]["tasks"]):
            if t["task"]["id"] == str(result._task._uuid):
                t["hosts"][host] = r
                return
        self._task_start(result._task)
        self.results[-1]["tasks"][-1]["hosts"][host] = r

    def v2_runner_on_ok(self, result, **kwargs):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False, **kwargs):
        self._record(result, failed=True)

    def v2_runner_on_unreachable(self, result, **kwargs):
        self._record(result, unreachable=True)

    def v2_runner_on_skipped(self, result, **kwargs):
        self._record(result, skipped=True)

    def v2_playbook_on_stats(self, stats):
        summary = {h: stats.summarize(h) for h in sorted(stats.processed.keys())}
        self._display.display(json.dumps({"plays": self.results, "stats": summary}, indent=2, sort_keys=True,
                                         default=str))
