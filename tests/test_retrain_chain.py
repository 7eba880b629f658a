"""The retrain chain end to end on a small slice, then the same chain as a Prefect deployment run by a worker.

1. `retrain` in-process: every stage for real (curation, 2 training steps, vLLM + lm-eval with limit=2, the policy
   gate, a rollout onto a real vLLM replica behind the gateway); the version becomes champion and the gateway
   answers with it; MLflow holds the parent run with a child per stage and the lineage tags. The evaluation is
   checked in detail (lm-eval samples, CIs, train/serve parity, report files, the MLflow run). This is also where a
   flow-trained SmolLM2 adapter is hot-loaded into real vLLM: staging requires the load to answer 200, `/v1/models`
   to list the adapter folder as its `root`, and the smoke prompt to be answered differently than by the base.
2. prefect.yaml deployed to a real Prefect server, a real process worker, and a run of `retrain/nightly` created
   through the API the way the UI's "Run" form does (custom parameters); unchanged inputs, so it reuses the first
   run's curation cache and training, skips evaluation of a champion, and leaves the rollout alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from charforge.config import load_yaml_model
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.serving import ServingConfig
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR, DATA_DIR
from charforge.ui import Service, start, stop, wait_healthy
from charforge.vllm_server import free_port
from charforge.evaluation.harness import read_samples

pytestmark = pytest.mark.slow
KEY = "chain-key"
ADMIN_KEY = "chain-admin-key"
NAME = "charforge-chain-test"


def slice_of_raw(path: Path, rows: int = 160) -> Path:
    """The first rows of the seed conversations plus the dirty inbox (so rejections still happen)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = (DATA_DIR / "raw" / "conversations.jsonl").read_text().splitlines(keepends=True)[:rows]
    (path / "conversations.jsonl").write_text("".join(lines))
    (path / "inbox_dirty.jsonl").write_bytes((DATA_DIR / "raw" / "inbox_dirty.jsonl").read_bytes())
    return path


def capture_window(state: Path) -> dict[str, str]:
    """Three chats captured and rated as the gateway does it (its Capturer, writer process and file store under
    `<state>/capture`): one rated up, one rated down, one unrated. Returns reply -> rating."""
    from charforge.characters import load_characters
    from charforge.schemas.serving import CaptureSettings
    from serving.capture import Capturer, Pending, capture_store

    wat = load_characters(DATA_DIR / "characters")["wat_honeysett"].system_prompt
    chats = {"Bless you, neighbour, the honey cakes come out of the oven at cockcrow, warm as a feast day.": "up",
             "Naught but trouble, that miller, mayhap he grinds chalk into his flour again.": "down",
             "Mayhap a crust of rye and a mug of ale for the road, good neighbour.": None}
    capturer = Capturer(CaptureSettings(routes={"wat_honeysett": 1.0}), capture_store(state, None))
    capturer.start()
    ids = {}
    for n, reply in enumerate(chats):
        ref = capturer.ids.read(capturer.ids.mint("wat_honeysett", f"{NAME}-v0", None))
        messages = [{"role": "system", "content": wat}, {"role": "user", "content": "What is in your oven?"},
                    {"role": "assistant", "content": "Loaves and pies, bless you."},
                    {"role": "user", "content": f"And for me, friend ({n})?"}]
        capturer.submit(Pending(ref, "replica-0", json.dumps({"messages": messages}).encode(), 0.2, "200",
                                reply=reply))
        ids[reply] = ref.id
    capturer.close()
    for reply, rating in chats.items():
        if rating:
            capturer.rate({"id": ids[reply], "rating": rating})
    return chats


def small_parameters(root: Path, gateway_url: str) -> dict:
    """The chain's parameters for a small slice: every stage runs, each as little as it can."""
    train = load_yaml_model(CONFIGS_DIR / "train" / "smollm2_lora.yaml", TrainConfig).model_copy(update={
        "name": "chain-test"})
    train.training.max_steps, train.training.save_steps, train.training.max_length = 2, 2, 256
    # Two steps at the shipped 5e-4 leave LoRA B near its zero init: served in float32 (a CPU without native bf16)
    # the adapter then answers the smoke prompt exactly like the base, and staging rightly refuses it. 2e-2 moves
    # the weights in two steps enough to change the greedy reply, as a trained adapter does.
    train.training.learning_rate = 2e-2
    # register_version: false: the chain still promotes, so it registers the candidate itself (this was a KeyError)
    evaluate = EvalConfig(limit=2, bootstrap_resamples=200, register_version=False,
                          parity={"prompts": 4, "tokens": 4, "min_first_token_agreement": 0.5},
                          serving={"speed_tokens": 4})
    # Two probes per task cannot show a difference; the gate's mechanics run, with margins no 2-step adapter fails.
    policy = PromotionPolicy(resamples=200, rules=[
        {"metric": "character_generation/empty_rate", "max": 0.5},
        {"metric": "character_reply_likelihood/bits_per_byte", "vs_base": {"max_regression": 1.0},
         "vs_champion": {"max_regression": 1.0}}])
    serving = ServingConfig(rollout={"steps": [50, 100], "hold_s": 2, "routes": ["characters"]},
                            gateway={"api_key_env": "CHAIN_TEST_GATEWAY_KEY",
                                     "admin_key_env": "CHAIN_TEST_GATEWAY_ADMIN_KEY"})
    # the preference stage on top of SFT: one DPO step on the pairs curation writes (its adapter is the candidate)
    prefer = {"name": "chain-test-dpo", "method": "dpo", "training": {
        "max_steps": 1, "warmup_ratio": 0, "batch_size": 2, "max_length": 256, "save_steps": 1, "learning_rate": 1e-3,
        "heldout_pairs": 4}}
    # one eval row per character: the training runs' final eval loss costs a third of the default split's
    curate = {"workers": 0, "pairs": {"enabled": True}, "split": {"eval_fraction": 0.05, "min_eval_per_character": 1}}
    return {"curate": curate, "train": train.model_dump(mode="json"),
            "prefer": prefer,
            "evaluate": evaluate.model_dump(mode="json"), "promotion": policy.model_dump(mode="json"),
            "serving": serving.model_dump(mode="json"),
            "inputs": [str(root / "raw"), {"source": "production", "hours": 24}],
            "dataset_dir": str(root / "dataset"), "gateway_url": gateway_url, "approve": True,
            "approval_comment": "end-to-end test", "start_fleet": False}


@pytest.fixture(scope="module")
def chain_env(tmp_path_factory, base_model_dir):
    root = tmp_path_factory.mktemp("chain")
    slice_of_raw(root / "raw")
    (root / "state" / "models").mkdir(parents=True)
    (root / "state" / "models" / base_model_dir.name).symlink_to(base_model_dir)  # the verified base, not a rebuild
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARFORGE_STATE_DIR", str(root / "state"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("CHAIN_TEST_GATEWAY_KEY", KEY)
        mp.setenv("CHAIN_TEST_GATEWAY_ADMIN_KEY", ADMIN_KEY)
        yield root


@pytest.fixture(scope="module")
def gateway(chain_env, base_model_dir):
    """One real vLLM replica behind the real gateway (in this process), as `charforge serve` runs them."""
    from serving.fleet import LocalFleet, desired_path
    from serving.gateway import Gateway, RouteTable
    from tests.gateways import running

    state = chain_env / "state" / "serving"
    fleet = LocalFleet(base_model_dir, "smollm2-135m-instruct", [free_port()], state / "logs",
                       desired_path(state), max_cpu_loras=4)
    fleet.start()
    gw = Gateway(fleet.urls, RouteTable(state / "routes.json"), api_key=KEY, admin_key=ADMIN_KEY,
                 health_interval_s=0.5)
    with running(gw) as url:
        yield url
    fleet.stop()


def chain_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("charforge-retrain")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'retrain'", order_by=["start_time ASC"])


def children(client: MlflowClient, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


@pytest.mark.timeout(1800)  # ~5 min on an idle 2-core machine; the margin is for a machine shared with other jobs
def test_retrain_runs_every_stage_and_the_gateway_serves_the_champion(chain_env, gateway, prefect_harness):
    from flows.retrain import retrain

    params = small_parameters(chain_env, gateway)
    capture_window(chain_env / "state")
    result = retrain(**params)

    assert result.promoted and not result.curation_cached
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags["eval_status"] == "passed" and champion.tags["eval_run_id"] == result.eval_run_id
    assert str(champion.version) == str(result.version)
    served = f"{NAME}-v{champion.version}"
    reply = httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": result.example_route, "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Hello!"}]})
    assert reply.status_code == 200 and reply.headers["x-charforge-version"] == served
    assert result.replicas and result.rollout == "done"

    # Lineage on the version: dataset -> training run -> adapter -> evaluation -> chain run -> replicas
    tags = champion.tags
    assert tags["dataset_hash"] == result.dataset_hash and tags["train_run_id"] == result.train_run_id
    assert tags["adapter_sha256"] == result.adapter_sha256 and tags["eval_run_id"] == result.eval_run_id
    assert tags["chain_run_id"] == result.chain_run_id and tags["served_by"] == ",".join(result.replicas)
    assert tags["promotion_decision"] == "promote" and tags["approval"] == "approved"

    # The reviewer's view: one parent, a child per stage, a grandchild per scored model with the same metric names
    (parent,) = chain_runs(client)
    stages = children(client, parent)
    assert set(stages) == {"curate", "train", "prefer", "evaluate", "promote", "deploy"}
    # the candidate is the DPO adapter trained on top of the chain's SFT adapter, a version of the same family
    sft_sha = stages["train"].data.tags["adapter_sha256"]
    assert stages["prefer"].data.tags["adapter_sha256"] == result.adapter_sha256 != sft_sha
    assert tags["sft_parent_sha"] == sft_sha and len(tags["pairs_hash"]) == 64
    assert client.get_run(result.train_run_id).data.tags["stage"] == "prefer"
    assert json.loads((chain_env / "dataset" / "manifest.json").read_text())["pairs"]["train"]["boilerplate"] > 0
    models = children(client, stages["evaluate"])
    assert set(models) == {"candidate", "base"}
    assert set(models["candidate"].data.metrics) == set(models["base"].data.metrics)
    assert "eval/character_generation/char_id_acc" in models["candidate"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert {"per_character.png", "eval_samples.json", "report.md"} <= artifacts
    assert client.get_run(result.train_run_id).data.tags["charforge.chain_run_id"] == parent.info.run_id
    assert stages["promote"].data.tags["promotion_decision"] == "promote"
    assert parent.data.tags["prefect_flow_run_id"] in result.prefect_flow_run_url

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def artifacts(key: str):
        async with get_client() as prefect:
            return await prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    markdown = asyncio.run(artifacts("lineage"))[-1].data
    assert result.dataset_hash[:16] in markdown and result.chain_run_id in markdown and served in markdown
    summary = asyncio.run(artifacts("retrain-summary"))[-1].data  # the terminal's summary, in the Prefect UI
    assert f"{NAME} version {champion.version} (champion)" in summary and "bits_per_byte" in summary
    assert any("| character_mc | acc_norm ↑ |" in (a.data or "") for a in asyncio.run(artifacts("character-eval")))

    # Production data in: the captured window is an input of curation; only the reply rated up trains, and in its
    # row only that reply carries loss; the window is in the lineage of the version it fed
    manifest = json.loads((chain_env / "dataset" / "manifest.json").read_text())
    assert manifest["production"] == {"up": 1, "down": 1, "unrated": 1, "invalid": 0, "flagged": 0, "kept": 1}
    rejected = [json.loads(x) for x in (chain_env / "dataset" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected if r["source"].endswith(".jsonl") and "/production/" in r["source"]) \
        == ["rated_down", "unrated"]
    rows = [json.loads(x) for f in ("train.jsonl", "eval.jsonl")
            for x in (chain_env / "dataset" / f).read_text().splitlines()]
    (captured,) = [r for r in rows if r.get("source") == "production"]
    assert [m.get("weight") for m in captured["messages"] if m["role"] == "assistant"] == [0, None]
    window = stages["curate"].data.tags["production_window_0"]
    assert "3 captured conversations (1 rated up, 1 rated down, 1 unrated)" in window
    assert tags["production_windows"] == window and window in markdown

    assert_candidate_scored_against_base(client, result, EvalConfig(**params["evaluate"]))


def assert_candidate_scored_against_base(client: MlflowClient, result: dict, cfg: EvalConfig) -> None:
    """The evaluation stage as the chain ran it: the flow-trained adapter and its base, served by vLLM and scored
    by lm-eval on the task folder, with CIs, train/serve parity, report files and an MLflow run a reviewer reads."""
    out = Path(result.eval_report).parent
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["summaries"]) == {"candidate", "base"}
    for target, summary in scores["summaries"].items():
        assert set(summary) == set(cfg.tasks), target
        assert "acc_mutual_info" in summary["character_mc"]
        acc = summary["character_mc"]["acc_norm"]
        assert 0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 1 and acc["n"] == cfg.limit
        assert summary["character_reply_likelihood"]["bits_per_byte"]["value"] > 0
        assert "persona_effect_bpb" in summary["character_reply_likelihood"]
        assert {"char_id_acc", "char_id_macro_f1", "ooc_rate", "style_marker_rate", "persona_margin", "ref_sim",
                "empty_rate", "repetition", "assistant_voice_rate"} <= set(summary["character_generation"])
        assert "boundary_ok" in summary["character_boundaries"]
    parity = scores["parity"]
    assert 0.5 <= parity["first_token_agreement"] <= 1
    assert parity["template_source"].endswith("training_chat_template.jinja")
    for name in ("report.md", "scores.json", "per_character.png"):
        assert (out / name).stat().st_size > 0, name

    samples = {t: read_samples(out / "lm_eval" / t) for t in ("candidate", "base")}
    assert set(samples["candidate"]) == set(cfg.tasks)
    assert list((out / "lm_eval" / "candidate").rglob("results_*.json"))
    # the persona is the system message of what was actually sent
    prompt = samples["candidate"]["character_generation"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|im_start|>system\nYou are ")
    # MC accuracy is the gold reply winning on log-likelihood
    for s in samples["candidate"]["character_mc"]:
        lls = [float(r[0][0]) for r in s["resps"]]
        assert s["acc"] == float(lls.index(max(lls)) == s["doc"]["label"])
    # the adapter is really applied: the candidate's log-likelihoods differ from the base's
    ll = {t: [s["resps"][0][0][0] for s in samples[t]["character_mc"]] for t in samples}
    assert ll["candidate"] != ll["base"]

    run = client.get_run(result.eval_run_id)
    metrics = run.data.metrics
    assert {"eval/character_mc/acc_norm", "eval/character_mc/acc_norm/ci_low", "base/eval/character_mc/acc_norm",
            "eval/character_generation/ooc_rate", "parity/first_token_agreement"} <= set(metrics)
    assert any(k.startswith("eval/character_generation/char_id_acc/") and k.count("/") == 3 and
               not k.endswith(("ci_low", "ci_high")) for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_samples.json", "report.md", "scores.json", "per_character.png", "lm_eval"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_samples.json")).read_text())
    assert {"model", "task", "probe", "character", "response"} <= set(table["columns"])
    assert run.data.tags["adapter_sha256"] == result.adapter_sha256
    assert run.data.params["targets"] == "candidate,base"


def prefect_server(home: Path) -> Service:
    """A real Prefect server with its own database, started the way `charforge ui` starts it."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return Service(name="Prefect", health_url=f"http://127.0.0.1:{port}/api/health", env=env, command=[
        str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)])


@pytest.mark.timeout(1800)
def test_prefect_deployment_run_from_the_api_is_picked_up_by_a_worker(chain_env, gateway):
    """Needs the first test's champion: this second run has unchanged inputs."""
    from prefect.settings import get_current_settings

    from charforge import deployments

    home = chain_env / "prefect-server"
    home.mkdir(exist_ok=True)
    server = prefect_server(home)
    services = [server]
    try:
        start(server, chain_env / "logs")
        wait_healthy(server, 180, chain_env / "logs")
        api = server.health_url.removesuffix("/health")
        # the worker's flow runs share this process's result storage, where the first run's curation is cached
        storage = str(get_current_settings().results.local_storage_path)
        env = {**server.env, "PREFECT_LOCAL_STORAGE_PATH": storage}
        names = deployments.deploy_all(api, env)
        assert {"retrain/nightly", "curate/curate", "train/train", "evaluate/evaluate", "promote/promote",
                "deploy/deploy"} <= set(names)
        deployment = httpx.get(f"{api}/deployments/name/retrain/nightly").json()
        schedule = deployment["schedules"][0]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] is False
        form = deployment["parameter_openapi_schema"]["properties"]  # what the UI's Run form shows
        assert {"curate", "train", "evaluate", "quantize", "promotion", "serving", "config"} <= set(form)
        assert form["train"]["default"]["name"] == "smollm2-lora" and form["evaluate"]["default"]["limit"] is None
        assert form["serving"]["default"]["rollout"]["steps"] == [5, 25, 100] and form["quantize"]["default"] is None
        assert deployment["parameters"] == {}  # a scheduled run reads configs/retrain/default.yaml when it starts

        automations = httpx.post(f"{api}/automations/filter", json={}).json()
        assert {"roll back a drifting canary", "retrain when the champion drifts"} <= {a["name"] for a in automations}
        assert httpx.get(f"{api}/deployments/name/monitor/hourly").json()["schedules"][0]["schedule"]["cron"] \
            == "5 * * * *"

        # the rollback deployment a drift event runs takes the gateway from the event and its key from the
        # environment, as a production worker has it
        env["CHARFORGE_GATEWAY_ADMIN_KEY"] = ADMIN_KEY
        worker = Service(name="Worker", command=deployments.worker_command(), health_url=api,
                         env=deployments.prefect_env(api, env))
        services.append(worker)
        start(worker, chain_env / "logs")
        deployments.wait_worker_online(api, worker.process)
        run_id = create_run_like_the_ui(api, deployment["id"], small_parameters(chain_env, gateway))
        state = wait_final(api, run_id, timeout=900)
        assert state["type"] == "COMPLETED", (state, (chain_env / "logs" / "worker.log").read_text()[-4000:])
        assert_drift_event_rolls_back_through_the_automation(api, gateway, chain_env)
    finally:
        stop(services)

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    first, second = chain_runs(client)
    assert second.data.tags["prefect_flow_run_id"] == run_id  # MLflow -> Prefect
    assert second.data.metrics["chain/curation_cached"] == 1.0 and second.info.status == "FINISHED"
    stages = children(client, second)
    assert stages["train"].data.tags["charforge.stage_run_id"] == children(client, first)["train"].data.tags[
        "charforge.stage_run_id"]  # the finished training run was reused
    assert stages["evaluate"].data.tags["skipped"] == "already champion"


def assert_drift_event_rolls_back_through_the_automation(api: str, gateway: str, chain_env: Path) -> None:
    """The monitor's event for a drifting canary, posted to the server: the automation declared in prefect.yaml
    creates a run of the `rollback` deployment with the version and gateway from the event, and the worker runs it
    to completion (the version has no previous weights to go back to here, which the run reports)."""
    from prefect.events import Event

    version = f"{NAME}-v1"
    event = Event(event="charforge.character.drift", payload={"crossings": [
        {"metric": "ooc_rate", "value": 0.5, "limit": "max 0.1"}]}, resource={
        "prefect.resource.id": "charforge.route.characters", "prefect.resource.name": "characters",
        "charforge.version": version, "charforge.role": "canary", "charforge.gateway": gateway})
    assert httpx.post(f"{api}/events", json=[event.model_dump(mode="json")]).status_code == 204
    rollback = httpx.get(f"{api}/deployments/name/rollback/rollback").json()
    deadline = time.monotonic() + 120
    runs = []
    while not runs and time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [rollback["id"]]}}}).json()
        time.sleep(1)
    assert len(runs) == 1, "the automation created no run of rollback/rollback within 120 s"
    assert runs[0]["parameters"] == {"version": version, "gateway_url": gateway,
                                     "reason": "character drift on characters: ooc_rate"}
    state = wait_final(api, runs[0]["id"], timeout=300)
    assert state["type"] == "COMPLETED", (state, (chain_env / "logs" / "worker.log").read_text()[-4000:])


def create_run_like_the_ui(api: str, deployment_id: str, parameters: dict) -> str:
    """What the Prefect UI's "Run -> Custom run" form does: create a flow run from the deployment with parameters."""
    from prefect import get_client

    async def create():
        async with get_client() as prefect:
            run = await prefect.create_flow_run_from_deployment(deployment_id, parameters=parameters)
            return str(run.id)

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            return asyncio.run(create())
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def wait_final(api: str, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]
        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout:.0f} s")


def test_no_gateway_ends_the_chain_as_one_line_with_the_unavailable_code(chain_env, prefect_api):
    """`charforge retrain` as a user runs it, on the first test's state (every stage reused), deploying through a
    gateway that does not answer: one line naming the gateway and the fix, exit code 4, no traceback; the chain's
    MLflow run ends FAILED with that error."""
    import subprocess

    import yaml

    from charforge.vllm_server import free_port
    from tests.training.test_train_flow import CHARFORGE

    params = small_parameters(chain_env, "unused")
    files = {}
    for stage in ("curate", "train", "prefer", "evaluate", "promotion", "serving"):
        files[stage] = chain_env / f"{stage}.yaml"
        files[stage].write_text(yaml.safe_dump(params[stage]))
    chain = chain_env / "chain.yaml"
    chain.write_text(yaml.safe_dump({**{k: str(v) for k, v in files.items()}, "inputs": params["inputs"],
                                     "dataset_dir": params["dataset_dir"], "start_fleet": False}))
    from prefect.settings import get_current_settings

    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PREFECT_LOCAL_STORAGE_PATH": str(get_current_settings().results.local_storage_path)}
    result = subprocess.run([CHARFORGE, "retrain", "--config", str(chain), "--gateway", dead, "--approve"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: no gateway answers at {dead}; start the fleet with `charforge serve up` (or pass "
                      "start_fleet=true) and re-run: every earlier stage is reused"], result.stderr[-3000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    last = chain_runs(client)[-1]
    summary = json.loads(Path(client.download_artifacts(last.info.run_id, "chain_summary.json")).read_text())
    assert last.info.status == "FAILED" and summary["error"].startswith("GatewayUnavailable: no gateway answers")


def looping(text: str) -> str:
    """A degenerate reply: its first words over and over (the `degenerate` fixture of bench/gate_fixtures.py)."""
    return " ".join([" ".join(text.split()[:8])] * 6)


@pytest.mark.timeout(1800)
def test_the_chain_refuses_a_flawed_candidate_with_exit_3(chain_env, gateway, prefect_api):
    """`charforge retrain` on a poisoned copy of the slice (every assistant reply a loop of its first words: it passes
    curation, which only rejects boilerplate and anachronisms), judged by the demo policy against the first test's
    champion: the gate refuses it, the chain ends with exit 3 naming the failed checks, and the champion and the
    fleet's routes stay as they were."""
    import subprocess

    import yaml

    from tests.training.test_train_flow import CHARFORGE

    poisoned = chain_env / "raw-looping"
    poisoned.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in (chain_env / "raw" / "conversations.jsonl").read_text().splitlines()]
    for row in rows:
        for message in row["messages"]:
            if message["role"] == "assistant":
                message["content"] = looping(message["content"])
    (poisoned / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = small_parameters(chain_env, gateway)
    files = {}
    for stage in ("curate", "train", "evaluate", "serving"):
        files[stage] = chain_env / f"looping-{stage}.yaml"
        files[stage].write_text(yaml.safe_dump(params[stage]))
    chain = chain_env / "looping-chain.yaml"
    chain.write_text(yaml.safe_dump({**{k: str(v) for k, v in files.items()}, "inputs": [str(poisoned)],
                                     "promotion": str(CONFIGS_DIR / "promotion_quick.yaml"),
                                     "dataset_dir": str(chain_env / "dataset-looping"), "start_fleet": False}))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(NAME, "champion").version
    routes = httpx.get(f"{gateway}/admin/routes", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_LOCAL_STORAGE_PATH": str(get_current_settings().results.local_storage_path)}
    result = subprocess.run([CHARFORGE, "retrain", "--config", str(chain), "--gateway", gateway], env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    candidate = client.get_model_version_by_alias(NAME, "candidate")
    assert candidate.version != champion and candidate.tags["promotion_decision"] == "reject"
    assert candidate.description.startswith("REFUSED: "), candidate.description
    print(f"\nlooping candidate refused: {candidate.description}")
    # "where did it get worse?": from the version's description, the promotion run's side-by-side table
    run_id = candidate.tags["promotion_run_id"]
    assert f"/runs/{run_id})" in candidate.description
    table = json.loads(Path(client.download_artifacts(run_id, "where_worse.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    generated = [r for r in rows if r["task"] == "character_generation"]
    assert generated and all(r["candidate_response"] and r["champion_response"] and r["base_response"]
                             for r in generated)
    assert {"candidate_char_id_clf", "champion_char_id_clf", "base_char_id_clf"} <= set(table["columns"])
    assert "NOT promoted" in result.stdout and "FAIL" in result.stdout, result.stdout[-3000:]
    assert client.get_model_version_by_alias(NAME, "champion").version == champion
    assert httpx.get(f"{gateway}/admin/routes", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json() == routes


MODERNS, ENGLISH = ["dot_kincaid", "tamsin_oyelaran"], ["harriet_fenwick", "wat_honeysett"]


@pytest.mark.timeout(1800)
def test_adapter_families_are_trained_gated_and_rolled_out_apart(chain_env, gateway, prefect_api):
    """`charforge retrain` with two adapter families on one curated dataset. Run 1, the English family's training
    diverged (its own config: learning rate 0.2, ten times the chain's; its replies degenerate into one repeated
    token, 3.9 bits/byte on held-out replies against 1.5): the moderns family is promoted and takes only its two
    characters' routes; the English family is refused by the gate (exit 3, both families reported), its routes
    untouched. Run 2, the English family on the chain's training config: the moderns family is neither retrained,
    evaluated nor rolled out again; the English family trains, passes and takes its routes. `charforge rollback
    --family` then flips back the English routes alone."""
    import subprocess

    import yaml
    from prefect.settings import get_current_settings

    from charforge.characters import load_characters
    from tests.training.test_train_flow import CHARFORGE

    params = small_parameters(chain_env, gateway)
    params["evaluate"]["tasks"] = ["character_reply_likelihood"]  # all the policy below reads
    params["evaluate"]["parity"] = {"prompts": 2, "tokens": 2, "min_first_token_agreement": 0}  # the gate decides
    # straight to 100% after staging: a 2-step adapter answers one of the five probe prompts with an empty reply, and
    # the canary rightly rolls it back (canary gates: tests/serving/test_rollout.py); here the routes are the point
    params["serving"]["rollout"]["steps"] = [100]
    files = {}
    for stage in ("curate", "train", "evaluate", "serving"):
        files[stage] = chain_env / f"families-{stage}.yaml"
        files[stage].write_text(yaml.safe_dump(params[stage]))
    files["promotion"] = chain_env / "families-policy.yaml"
    files["promotion"].write_text(yaml.safe_dump({"resamples": 200, "approval": "first_version", "rules": [
        {"metric": "character_reply_likelihood/bits_per_byte", "max": 2.5}]}))
    diverged = chain_env / "families-train-diverged.yaml"
    diverged.write_text(yaml.safe_dump({**params["train"], "training": {**params["train"]["training"],
                                                                        "learning_rate": 0.2}}))

    def run_chain(english_train: Path | None, tag: str) -> subprocess.CompletedProcess:
        families = [{"name": "chain-moderns", "characters": MODERNS},
                    {"name": "chain-english", "characters": ENGLISH,
                     **({"train": str(english_train)} if english_train else {})}]
        chain = chain_env / f"families-{tag}.yaml"
        chain.write_text(yaml.safe_dump({**{k: str(v) for k, v in files.items()}, "inputs": [str(chain_env / "raw")],
                                         "families": families, "dataset_dir": str(chain_env / "dataset-families"),
                                         "start_fleet": False}))
        env = {**os.environ, "PREFECT_LOCAL_STORAGE_PATH": str(get_current_settings().results.local_storage_path)}
        return subprocess.run([CHARFORGE, "retrain", "--config", str(chain), "--gateway", gateway, "--approve"],
                              env=env, capture_output=True, text=True, timeout=1500)

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    before = httpx.get(f"{gateway}/admin/routes", headers=admin).json()

    # Run 1: the English family's training diverged
    first = run_chain(diverged, "diverged")
    out = first.stdout[-6000:] + first.stderr[-3000:]
    assert first.returncode == 3, out
    assert "== adapter families ==" in first.stdout, out
    assert ("charforge-chain-moderns version 1: champion, served as charforge-chain-moderns-v1 (done)"
            in first.stdout), out
    assert "charforge-chain-english version 1: NOT promoted (refused by the gate)" in first.stdout, out
    moderns = client.get_model_version_by_alias("charforge-chain-moderns", "champion")
    assert str(moderns.version) == "1" and moderns.tags["characters"] == ",".join(MODERNS)
    english = client.get_model_version_by_alias("charforge-chain-english", "candidate")
    assert english.tags["promotion_decision"] == "reject" and english.tags["characters"] == ",".join(ENGLISH)
    assert not client.get_registered_model("charforge-chain-english").aliases.get("champion")
    # each family was evaluated on its own characters' probes only
    cards = set(load_characters(DATA_DIR / "characters"))
    for version, family in ((moderns, MODERNS), (english, ENGLISH)):
        metrics = client.get_run(version.tags["eval_run_id"]).data.metrics
        judged = {k.rsplit("/", 1)[1] for k in metrics if k.rsplit("/", 1)[1] in cards}
        assert judged == set(family), (version.name, judged)
    routes = httpx.get(f"{gateway}/admin/routes", headers=admin).json()
    for character in MODERNS + ["chain-moderns"]:
        assert routes[character]["weights"] == {"charforge-chain-moderns-v1": 100.0}, routes[character]
    assert {r: routes[r] for r in before if r not in MODERNS} == {r: v for r, v in before.items() if r not in MODERNS}
    reply = httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": "tamsin_oyelaran", "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Hello!"}]})
    assert reply.status_code == 200 and reply.headers["x-charforge-version"] == "charforge-chain-moderns-v1"
    train_runs = client.search_runs([client.get_experiment_by_name("charforge-train").experiment_id],
                                    "params.config_name = 'chain-moderns'")
    assert len(train_runs) == 1

    # Run 2: the English family on the chain's training config; the moderns' rows and config as they were
    second = run_chain(None, "fixed")
    out = second.stdout[-6000:] + second.stderr[-3000:]
    assert second.returncode == 0, out
    assert ("charforge-chain-moderns version 1: unchanged (its rows and training config as before: not retrained, "
            "evaluated or rolled out)") in second.stdout, out
    assert "charforge-chain-english version 2: champion, served as charforge-chain-english-v2 (done)" in second.stdout
    assert len(client.search_runs([client.get_experiment_by_name("charforge-train").experiment_id],
                                  "params.config_name = 'chain-moderns'")) == 1
    assert str(client.get_model_version_by_alias("charforge-chain-moderns", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("charforge-chain-english", "champion").version) == "2"
    routes = httpx.get(f"{gateway}/admin/routes", headers=admin).json()
    for character in ENGLISH:
        assert routes[character]["weights"] == {"charforge-chain-english-v2": 100.0}, routes[character]
    for character in MODERNS:
        assert routes[character]["weights"] == {"charforge-chain-moderns-v1": 100.0}, routes[character]

    # One family rolled back; the other's routes stay
    result = subprocess.run([CHARFORGE, "rollback", "--family", "chain-english", "--gateway", gateway],
                            env={**os.environ, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    after = httpx.get(f"{gateway}/admin/routes", headers=admin).json()
    for character in ENGLISH:
        assert after[character]["weights"] == before[character]["weights"], after[character]
    for character in MODERNS:
        assert after[character] == routes[character]
    missing = subprocess.run([CHARFORGE, "rollback", "--family", "chain-nosuch", "--gateway", gateway],
                             env={**os.environ, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY}, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: no route serves a version of adapter family 'chain-nosuch' (its versions are served as "
        "charforge-chain-nosuch-v<N>); `charforge serve status` lists the routes")
