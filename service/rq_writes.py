"""RQ's writes that enqueue a new job, recorded from RQ once per queue and timeout and filled in per submission.

RQ builds a job as Python objects (a `Job`, its dict, its serializer check, its timestamps) before it stages
the writes, which costs a tenth of a submission's time in the API process. Two jobs of one queue and timeout
differ in those writes only by their id and RQ's two timestamps, because the task takes no arguments (it
reads its job id from RQ). So RQ stages the writes once for a placeholder id, and each submission copies them
with its own id and time. `tests/service/test_rq_writes.py` checks the copy against RQ's own writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rq import Queue
from rq.utils import utcformat

from hoppatch.jobs import TASK

PLACEHOLDER_ID = "job_placeholder_of_rq_writes"
TIME_FIELDS = frozenset({"created_at", "enqueued_at"})
"""The fields of RQ's job hash that hold the moment the job was made; RQ writes them in `utcformat`."""
RECORDED_MAX = 256
"""Distinct (queue, timeout) pairs kept; a job's timeout follows its budget, which a client chooses."""


@dataclass(frozen=True)
class RecordedCommand:
    """One of RQ's staged commands, with the positions a submission fills in."""

    args: tuple
    id_positions: tuple[int, ...]
    time_positions: tuple[int, ...]

    @classmethod
    def of(cls, args: tuple) -> RecordedCommand:
        ids = tuple(i for i, a in enumerate(args) if isinstance(a, str) and PLACEHOLDER_ID in a)
        times = tuple(i for i in range(1, len(args)) if args[0] == "HSET" and args[i - 1] in TIME_FIELDS)
        return cls(args, ids, times)

    def fill(self, job_id: str, stamp: str) -> list:
        args = list(self.args)
        for i in self.id_positions:
            args[i] = args[i].replace(PLACEHOLDER_ID, job_id)
        for i in self.time_positions:
            args[i] = stamp
        return args


class RQJobWrites:
    """The commands that put a job on an RQ queue, as RQ stages them, for any job id."""

    def __init__(self, retention_seconds: int) -> None:
        self.retention = retention_seconds
        self._recorded: dict[tuple[str, int], list[RecordedCommand]] = {}

    def commands(self, queue: Queue, job_id: str, timeout: int, created_at: datetime) -> list[list]:
        recorded = self._recorded.get((queue.name, timeout)) or self._record(queue, timeout)
        stamp = utcformat(created_at)
        return [command.fill(job_id, stamp) for command in recorded]

    def _record(self, queue: Queue, timeout: int) -> list[RecordedCommand]:
        staged = queue.connection.pipeline()  # never executed: it only collects RQ's commands
        queue.enqueue_call(
            TASK, job_id=PLACEHOLDER_ID, pipeline=staged, timeout=timeout,
            result_ttl=self.retention, failure_ttl=self.retention,
        )
        recorded = [RecordedCommand.of(tuple(args)) for args, _ in staged.command_stack]
        if len(self._recorded) >= RECORDED_MAX:
            self._recorded.clear()
        self._recorded[(queue.name, timeout)] = recorded
        return recorded
