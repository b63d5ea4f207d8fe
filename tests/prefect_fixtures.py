"""One Prefect test harness (a temporary API server on SQLite, ~15 s to start) shared by every test module that
runs flows, however many of them import `prefect_harness`; reading back what a run logged."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

_stack: ExitStack | None = None


def _start() -> None:
    global _stack
    if _stack is None:
        import os

        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls (no network)
        from prefect.testing.utilities import prefect_test_harness

        _stack = ExitStack()
        _stack.enter_context(prefect_test_harness(server_startup_timeout=90))


@pytest.fixture(scope="session")
def prefect_harness():
    """Session fixtures are torn down at the end of the session, so the first teardown may close the harness."""
    global _stack
    _start()
    yield
    if _stack is not None:
        _stack.close()
        _stack = None


def run_logs(flow_run_id) -> str:
    """Every message the flow run and its task runs logged, as stored by the API (after flushing the log worker)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    logs: list = []
    with get_client(sync_client=True) as client:
        while True:  # the API answers in pages (200 logs by default)
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=len(logs))
            if not page:
                break
            logs += page
    return "\n".join(log.message for log in logs)
