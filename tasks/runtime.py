"""The Prefect side every task module shares: the run context, links to the Prefect UI, which failures are retried,
and flow runs without Prefect's heartbeat for command-line runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from charforge.errors import CharforgeError, is_transient
from charforge.settings import platform


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry only what may pass by itself (see `charforge.errors.is_transient`): a
    connection to MLflow, Prefect, vLLM or a replica refused or reset. A gate's refusal, bad input or a bug fails
    at once."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by the failed state
        return is_transient(exc)
    return False


# Task options for work that talks to MLflow or a server: two more tries, 5 s apart, for transient failures only.
TRANSIENT_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_if_transient}


def current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def prefect_ui() -> str:
    """The Prefect UI showing these flow runs: PREFECT_UI_URL, the server of PREFECT_API_URL, or `charforge ui`'s
    (local runs without a server write to the same database it serves)."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() if os.environ.get("PREFECT_API_URL") else None
    return (ui or f"http://{platform().ui.host}:{platform().ui.prefect_port}").rstrip("/")


def flow_run_url(flow_run_id: str) -> str:
    return f"{prefect_ui()}/runs/flow-run/{flow_run_id}"


def flow_run_tags() -> dict[str, str]:
    """Tags that link an MLflow run to the Prefect flow run that produced it (empty outside a flow)."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_UI_URL

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    tags = {"prefect_flow_run_id": str(ctx.flow_run.id), "prefect_flow_name": ctx.flow.name}
    ui = PREFECT_UI_URL.value()
    if ui:
        tags["prefect_flow_run_url"] = f"{ui.rstrip('/')}/runs/flow-run/{ctx.flow_run.id}"
    return tags


@contextmanager
def quiet_flow_heartbeats() -> Iterator[None]:
    """Flows run in this process without Prefect's flow-run heartbeat, unless the user set its frequency
    (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, its legacy name, a Prefect profile or prefect.toml).

    Prefect 3.9 (3.9.1 measured) beats every 180 s from a thread that sleeps in 1 s steps and is joined when the
    flow ends, so every flow and subflow ends up to 1 s late (a no-op flow: 1.10 s with it, 0.12 s without; 0.83 s
    of a 1.13 s cached re-curation). The beats only matter to a zombie-detection automation watching deployment
    runs, and those run in a worker's process, which keeps Prefect's default. Environment variables cannot express
    "off" (None).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:  # set in the environment or a profile
        yield
        return

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class _NoTracebackForExpectedErrors(logging.Filter):
    """A `CharforgeError` says what happened and what to do in its message; Prefect's run loggers would print its
    traceback (into the terminal and the run's log) as if it were a bug. The log line stays, the traceback goes;
    any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CharforgeError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_errors() -> None:
    """Install the filter on Prefect's flow-run and task-run loggers (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForExpectedErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForExpectedErrors())
