"""Which failures Prefect retries: only the transient ones (a connection to MLflow, Prefect, vLLM or the gateway
refused or reset). A refusal, bad input or a bug fails at once: a retry would fail the same way (and, for an
evaluation, start vLLM again first). The real task `record-stage` of the retrain chain, in a real Prefect flow; the
MLflow call under it is replaced by a fake that fails as MLflow does."""

from __future__ import annotations

import httpx
import pytest
from mlflow.exceptions import MlflowException
from prefect import flow

from charforge import chain_tracking
from charforge.errors import Refused, Transient, is_transient
from charforge.evaluation.parity import ParityError
from charforge.vllm_server import VLLMStartError
from tasks.chain import record_stage


def run_with_failures(monkeypatch, failures: list[BaseException]) -> tuple[list[int], str]:
    calls = []

    def fake_stage_child(parent, stage, stage_run_id, **kw):  # a fake MLflow that fails `failures` first
        calls.append(len(calls))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "child-run"

    monkeypatch.setattr(chain_tracking, "stage_child", fake_stage_child)

    @flow
    def chain_step() -> str:
        return record_stage.with_options(retry_delay_seconds=0)("parent-run", "train", None, metrics={})

    try:
        return calls, chain_step()
    except Exception as exc:  # the flow run failed: what the caller sees
        return calls, f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("transient", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/create failed with exception "
                    "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded (Connection refused)"),
    Transient("replica still starting"),
])
def test_a_transient_failure_is_retried(monkeypatch, prefect_harness, transient):
    calls, outcome = run_with_failures(monkeypatch, [transient, transient])
    assert outcome == "child-run" and len(calls) == 3  # two retries, then it went through


def test_a_transient_failure_that_does_not_pass_fails_after_the_retries(monkeypatch, prefect_harness):
    calls, outcome = run_with_failures(monkeypatch, [httpx.ConnectError("refused")] * 5)
    assert len(calls) == 3 and outcome == "ConnectError: refused"


@pytest.mark.parametrize("deterministic", [
    ParityError("chat template mismatch between training and serving"),
    Refused("the adapter cannot be served by the fleet"),
    VLLMStartError("vLLM exited with code 1 before it was ready: ValueError: bad rank"),
    KeyError("registered"),
    MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'x' not found"),
])
def test_a_deterministic_failure_is_not_retried(monkeypatch, prefect_harness, deterministic):
    calls, outcome = run_with_failures(monkeypatch, [deterministic])
    assert len(calls) == 1 and outcome.startswith(type(deterministic).__name__)
    assert not is_transient(deterministic)
