"""Registry and promotion against a real MLflow sqlite store and Prefect: versions with lineage, the policy gate,
aliases, idempotent re-runs, a reviewer's approval, and a crash between decision and alias move."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from charforge.checksums import write_manifest
from charforge.tracking import use_experiment
from charforge.registry import register_candidate
from flows.promote import promote
from charforge import registry
from charforge.errors import InputError, Refused

CHARFORGE = str(Path(sys.executable).parent / "charforge")
PROBES = [f"p{i}" for i in range(30)]
NAME = "charforge-test-lora"
POLICY = """\
approval: first_version
resamples: 500
rules:
  - metric: character_generation/char_id_acc
    vs_base: {max_regression: 0.05}
    vs_champion: {max_regression: 0.05}
  - metric: character_generation/ooc_rate
    max: 0.10
    vs_champion: {max_regression: 0.03}
"""


def per_probe(char_id: float, ooc: float) -> dict:
    return {"character_generation/char_id_acc": {p: char_id for p in PROBES},
            "character_generation/ooc_rate": {p: (1.0 if i < ooc * len(PROBES) else 0.0) for i, p in enumerate(PROBES)}}


def register(tmp_path: Path, label: str, char_id: float, ooc: float) -> str:
    """An adapter folder + an evaluation run with per-probe scores, registered the way the evaluate flow does."""
    adapter = tmp_path / f"adapter-{label}"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text(f"weights {label}")
    lineage = {"base_model": "smollm2-135m-instruct", "base_model_sha": "b" * 64, "dataset_hash": "d" * 64,
               "train_config": "test-lora", "mlflow_run_id": "none"}
    write_manifest(adapter, {"lineage": lineage})
    use_experiment("evaluate")
    with mlflow.start_run() as run:
        mlflow.log_dict({"candidate": per_probe(char_id, ooc), "base": per_probe(0.5, 0.0)}, "per_probe.json")
    return register_candidate(adapter, lineage, run.info.run_id, "probes-sha").uri


@pytest.fixture
def registry_env(tmp_path, monkeypatch, mlflow_store, prefect_harness):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    policy = tmp_path / "promotion.yaml"
    policy.write_text(POLICY)
    return tmp_path, str(policy), MlflowClient(mlflow_store)


def aliases(client: MlflowClient) -> dict:
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def test_versions_are_promoted_refused_and_rolled_into_previous(registry_env, prefect_api):
    tmp_path, policy, client = registry_env
    v1 = register(tmp_path, "one", char_id=0.8, ooc=0.0)
    assert v1 == f"models:/{NAME}/1" and aliases(client) == {"candidate": "1"}
    tags = client.get_model_version(NAME, "1").tags
    assert {"base_model", "base_model_sha", "dataset_hash", "adapter_sha256", "train_run_id", "eval_run_id",
            "quantized_base", "prefect_flow_run_url"} <= set(tags)
    assert register(tmp_path, "one-again", 0.8, 0.0) != v1  # a different adapter is a new version...
    assert client.get_model_version(NAME, "2").tags["adapter_sha256"] != tags["adapter_sha256"]

    first = promote(candidate=v1, policy_file=policy, approve=True, comment="first champion, read the samples")
    assert first.promoted and aliases(client)["champion"] == "1"
    assert client.get_model_version(NAME, "1").tags["approval"] == "approved"
    assert client.get_model_version(NAME, "1").tags["approval_comment"] == "first champion, read the samples"

    bad = register(tmp_path, "ooc", char_id=0.8, ooc=0.5)
    refused = promote(candidate=bad, policy_file=policy)
    assert not refused.promoted and aliases(client)["champion"] == "1"
    tags = client.get_model_version(NAME, "3").tags
    assert tags["promotion_decision"] == "reject"
    assert "character_generation/ooc_rate: 0.500 > cap 0.1 -> FAIL" in tags["promotion_reasons"]
    assert "character_generation/ooc_rate: gain vs champion -0.500" in tags["promotion_reasons"]
    # each rule's margin and the deciding rule on the version; a one-line summary as its description
    assert json.loads(tags["promotion_margins"])["character_generation/ooc_rate max"] == pytest.approx(-0.4)
    assert tags["promotion_deciding_rule"] == "character_generation/ooc_rate vs_champion"
    assert float(tags["promotion_deciding_margin"]) < -0.4  # the CI's lower bound, further out than the cap
    description = client.get_model_version(NAME, "3").description
    assert description.startswith("REFUSED: 2 of 4 checks fail; deciding: character_generation/ooc_rate: gain vs "
                                  "champion -0.500"), description
    assert client.get_model_version(NAME, "1").description.startswith(
        "PROMOTE: all 2 checks pass (no champion yet: vs-champion rules skipped); tightest: "
        "character_generation/ooc_rate max (margin +0.100) ([promotion run](#/experiments/")
    # in the Prefect UI's runs list a refusal is not a green "Completed" like a promotion
    states = asyncio.run(promote_run_states())
    assert states[-2:] == [("COMPLETED", "Completed"), ("COMPLETED", "Refused")], states
    # the command line ends with exit 3 and the reasons
    cli = subprocess.run([CHARFORGE, "promote", "--candidate", bad, "--policy", policy], capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 3, cli.stderr[-2000:]
    assert f"{NAME} version 3: NOT promoted" in cli.stdout and "ooc_rate: 0.500 > cap 0.1 -> FAIL" in cli.stdout

    better = register(tmp_path, "better", char_id=0.9, ooc=0.0)
    second = promote(candidate=better, policy_file=policy)  # not the first version: no approval needed
    assert second.promoted and second.changed
    assert {k: v for k, v in aliases(client).items() if k != "candidate"} == {"champion": "4", "previous": "1"}
    assert client.get_model_version(NAME, "4").tags["approval"] == "not_required"

    again = promote(candidate=better, policy_file=policy)
    assert again.promoted and not again.changed and again.reasons == ("already champion",)
    assert aliases(client)["previous"] == "1"


async def promote_run_states() -> list[tuple[str, str]]:
    """(state type, state name) of the promote flow runs, oldest first, as the Prefect API gives them to its UI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as prefect:
        runs = await prefect.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        flows = {f.id: f.name for f in await prefect.read_flows()}
    return [(r.state.type.value, r.state.name) for r in runs if flows.get(r.flow_id) == "promote"]


def test_a_version_without_a_passing_decision_never_becomes_champion(registry_env):
    tmp_path, policy, client = registry_env
    register(tmp_path, "one", 0.8, 0.0)
    with pytest.raises(Refused, match="has no passing evaluation, promotion decision and approval recorded") as err:
        registry.promote_aliases(client, NAME, "1")
    assert err.value.exit_code == 3
    assert "champion" not in aliases(client)


def test_first_version_waits_for_a_reviewer_in_the_prefect_ui(registry_env):
    """The flow pauses for input; a reviewer's answer (sent the way the Prefect UI sends it) resumes it."""
    import asyncio
    import threading

    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    tmp_path, policy, client = registry_env
    uri = register(tmp_path, "one", 0.8, 0.0)
    result = {}
    runner = threading.Thread(target=lambda: result.update(outcome=promote(candidate=uri, policy_file=policy)))
    runner.start()

    async def paused_run():
        async with get_client() as prefect:
            for _ in range(120):
                runs = await prefect.read_flow_runs()
                paused = [r for r in runs if r.state and r.state.is_paused()]
                if paused:
                    return paused[0].id
                await asyncio.sleep(1)
        raise AssertionError("the promote flow never paused for approval")

    flow_run_id = asyncio.run(paused_run())
    assert "champion" not in aliases(client)
    assert client.get_model_version(NAME, "1").tags["approval"] == "pending"
    resume_flow_run(flow_run_id, run_input={"approve": False, "comment": "voice too modern", "reviewer": "dana"})
    runner.join(timeout=120)
    outcome = result["outcome"]
    assert outcome.promoted is False and outcome.reasons[-1] == "rejected by reviewer: voice too modern"
    tags = client.get_model_version(NAME, "1").tags
    assert (tags["approval"], tags["approval_reviewer"]) == ("rejected", "dana")
    assert client.get_model_version(NAME, "1").description == "REJECTED by reviewer dana: voice too modern"
    assert asyncio.run(promote_run_states())[-1] == ("COMPLETED", "Rejected")
    assert "champion" not in aliases(client)


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["after_decision", "alias_move"])
def test_crash_between_decision_and_alias_move_leaves_a_consistent_registry(registry_env, crash_at, prefect_api):
    tmp_path, policy, client = registry_env
    v1 = register(tmp_path, "one", 0.8, 0.0)
    promote(candidate=v1, policy_file=policy, approve=True)
    v2 = register(tmp_path, "two", 0.9, 0.0)
    env = {**os.environ, "CHARFORGE_CRASH_AT": crash_at}  # the session's Prefect server (`prefect_api`)
    command = [CHARFORGE, "promote", "--candidate", v2, "--policy", policy]
    log = tmp_path / "crashed.log"
    with open(log, "w") as out:  # a file, not a pipe: a child the kill orphans would hold a pipe open
        crashed = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        code = crashed.wait(timeout=600)
    try:
        os.killpg(crashed.pid, signal.SIGKILL)  # whatever the kill orphaned in its process group
    except ProcessLookupError:
        pass
    assert code == -signal.SIGKILL, log.read_text()[-2000:]

    state = aliases(client)
    assert state["champion"] == "1" and "previous" not in state  # the aliases did not move
    assert client.get_model_version(NAME, "2").tags["promotion_decision"] == "promote"  # the decision is recorded
    pending = client.get_registered_model(NAME).tags.get(registry.PENDING)
    assert (pending is not None) == (crash_at == "alias_move")

    env.pop("CHARFORGE_CRASH_AT")
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.startswith(f"{NAME} version 2: champion")
    state = aliases(client)
    assert (state["champion"], state["previous"]) == ("2", "1")
    assert registry.PENDING not in client.get_registered_model(NAME).tags


def test_cli_errors_name_the_bad_input(registry_env, tmp_path):
    _, policy, _ = registry_env
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}

    def run(*args):
        r = subprocess.run([CHARFORGE, "promote", *args], env=env, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stderr.strip()

    code, message = run("--candidate", f"models:/{NAME}/7", "--policy", policy)
    assert code == 2 and message.startswith(f"error: models:/{NAME}/7: not in the MLflow registry at sqlite:///")
    assert run("--candidate", "charforge-x/1", "--policy", policy) == (
        2, "error: charforge-x/1: expected models:/<name>/<version> or models:/<name>@<alias>")
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text("rules:\n  - metric: character_mc/acc_norm\n    vs_bsae: {max_regression: 0.1}\n")
    assert run("--candidate", f"models:/{NAME}/1", "--policy", str(bad)) == (
        2, f"error: {bad}: key 'rules.0.vs_bsae': unknown key, did you mean 'vs_base'?")
    uri = register(tmp_path, "one", 0.8, 0.0)
    code, message = run("--candidate", uri, "--policy", policy)  # the flow ran: its log precedes the error
    assert code == 2 and [line for line in message.splitlines() if line.startswith("error: ")] == [
        f"error: {uri} passes the policy and needs a reviewer's approval: it waits for a reviewer only when the "
        "flow runs against a Prefect server (PREFECT_API_URL); here pass --approve or --reject with --comment"]


def test_an_alias_download_follows_the_alias_when_it_moves(registry_env):
    """`fleet.checkpoint: models:/name@champion` and evaluation fetch by alias: the download is kept under the version
    the alias resolved to, so after the alias moves the next fetch gets the new version (before: cached under
    `name-at-champion` and never refreshed, so the old champion was served forever)."""
    tmp_path, _, client = registry_env
    register(tmp_path, "one", 0.8, 0.0)
    register(tmp_path, "two", 0.8, 0.0)
    downloads = tmp_path / "downloads"
    client.set_registered_model_alias(NAME, "champion", "1")
    first = registry.fetch_verified(f"models:/{NAME}@champion", downloads)
    assert (first / "adapter_model.safetensors").read_text() == "weights one" and first.name == f"{NAME}-1"
    client.set_registered_model_alias(NAME, "champion", "2")
    second = registry.fetch_verified(f"models:/{NAME}@champion", downloads)
    assert (second / "adapter_model.safetensors").read_text() == "weights two" and second.name == f"{NAME}-2"
    with pytest.raises(InputError, match=f"models:/{NAME}@nope: cannot fetch from the MLflow registry"):
        registry.fetch_verified(f"models:/{NAME}@nope", downloads)
