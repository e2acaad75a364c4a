"""A job's run context: its clock, its cancellation and its progress, for every stage and forward pass.

`run_job` enters one per job; `checkpoint()`, called before every forward pass, ends the job there when it
was cancelled or ran past its deadline. Outside a job (tests, notebooks) there is none and checkpoints pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from .errors import BudgetExceeded, Cancelled

ProgressFn = Callable[[str, float, str], None]
"""Called with (stage, fraction of the whole job done, message)."""


@dataclass
class RunContext:
    max_seconds: float
    should_stop: Callable[[], bool] | None = None
    progress: ProgressFn | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    """Time spent per stage; a stage entered twice (evaluate, before and after the edit) adds up."""
    stage_name: str = "start"
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.perf_counter() + self.max_seconds

    def check(self) -> None:
        if self.should_stop and self.should_stop():
            raise Cancelled(f"cancelled during {self.stage_name}")
        if time.perf_counter() > self.deadline:
            raise BudgetExceeded(f"the job ran past budget.max_seconds during {self.stage_name}")

    @contextmanager
    def stage(self, name: str, fraction: float, message: str) -> Iterator[None]:
        self.stage_name = name
        self.check()
        if self.progress:
            self.progress(name, fraction, message)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


_current: ContextVar[RunContext | None] = ContextVar("hoppatch_run", default=None)


@contextmanager
def running(context: RunContext) -> Iterator[RunContext]:
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def checkpoint() -> None:
    """Raise `Cancelled` or `BudgetExceeded` if the job in progress should stop here."""
    context = _current.get()
    if context is not None:
        context.check()
