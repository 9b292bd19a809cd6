"""A bound on each test's wall time, for mutation runs only: `[tool.mutmut]` in pyproject.toml loads this plugin
(`-p tests.mutation_timeout`); ordinary test runs never do.

A mutant that stops the scheduler's worker leaves a test waiting for ever (the lifespan's drain waits on a queue
nobody empties). mutmut's own limit is 15 times the estimated time of every test that reaches the function,
minutes for each such mutant. Past BOUND_S, faulthandler prints every thread's stack and ends the process with
exit status 1, which mutmut counts as the tests failing: the mutant is caught in seconds. It measures nothing:
each test in the selection takes well under a second on its own.
"""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Iterator

import pytest

BOUND_S = 20.0
# pytest captures file descriptor 2 while a test runs (what is written there is lost on exit): the stacks go to a
# copy of it taken when the plugin loads, before capturing starts.
_STDERR = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    faulthandler.dump_traceback_later(BOUND_S, exit=True, file=_STDERR)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
