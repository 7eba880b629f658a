"""The retrain chain: curate -> train -> [prefer: DPO/KTO on the SFT adapter] -> evaluate (candidate vs base vs
champion) -> [quantize + evaluate quantized] -> promote -> deploy, each stage its own flow called here as a
subflow; what passes between them is typed results (paths, hashes and registry URIs).

Run it:  charforge retrain [--config configs/retrain/default.yaml] [--approve --comment TEXT]
         (configs/retrain/families.yaml: one adapter per group of characters, each gated and rolled out on its own)
         or "Run" on the `retrain/nightly` deployment in the Prefect UI (prefect.yaml): the stage configs are its form.

Unchanged inputs are reused rather than recomputed: curation is cached on its input fingerprint, training on its
run identity (a finished run returns its adapter), an evaluation on (adapter, champion, evaluation config); a
candidate that is already champion skips evaluation and promotion, and a version the gateway already serves at 100%
is not rolled out again. Subflows are not retried as a whole: their tasks retry the transient failures (a
connection to MLflow, Prefect, vLLM or the gateway refused or reset), and every stage is safe to run again after a
crash (curation and training resume, promotion and deployment complete an interrupted run).

The reviewer's view is one MLflow parent run per chain run in `charforge-retrain` (charforge/chain_tracking.py), and
the lineage (dataset -> training run -> adapter -> evaluations -> version -> replicas) is written as tags on the
registry version and as the Prefect markdown artifact `lineage`.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from charforge.chain import ChainParameters, families_failed, families_text, family_chain, preference_stage
from charforge.results import ChainDecision, ChainSummary, CuratedDataset, Deployment, TrainedAdapter
from charforge.schemas.curate import CurateConfig
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.prefer import PreferConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.schemas.retrain import ProductionInput
from charforge.schemas.serving import ServingConfig
from charforge.schemas.train import TrainConfig
from flows.curate import curate as curate_flow
from flows.deploy import deploy as deploy_flow
from flows.evaluate import evaluate as evaluate_flow
from flows.prefer import prefer as prefer_flow
from flows.promote import promote as promote_flow
from flows.quantize import quantize as quantize_flow
from flows.train import train as train_flow
from tasks.curate import export_production_window
from tasks.chain import (ChampionRef, already_serving, approval_hint, cached_evaluation, close_chain_run,
                         find_champion, keep_champion, open_chain_run, quantization_for, reach_gateway,
                         record_deployment, record_evaluation, record_lineage, record_promotion, record_stage,
                         register_for_promotion, require_servable, resolve_parameters)


Curation = tuple[CuratedDataset, tuple[str, ...]]  # the curated dataset and its production windows, described


# log_prints stays off: it would be inherited by the train subflow, where `datasets` fingerprints functions by
# printing their disassembly (thousands of lines into the run log).
@flow(name="retrain")
def retrain(
    curate: CurateConfig | None = None,
    train: TrainConfig | None = None,
    evaluate: EvalConfig | None = None,
    promotion: PromotionPolicy | None = None,
    serving: ServingConfig | None = None,
    quantize: QuantizeConfig | None = None,
    prefer: PreferConfig | None = None,
    inputs: list[str | ProductionInput] | None = None,
    families: list[TrainConfig] | None = None,
    dataset_dir: str | None = None,
    deploy: bool | None = None,
    start_fleet: bool | None = None,
    gateway_url: str | None = None,
    approve: bool | None = None,
    approval_comment: str = "",
    config: str = "configs/retrain/default.yaml",
) -> ChainSummary | list[ChainSummary]:
    """Curate, train, evaluate against base and champion, promote by policy, and roll the new champion out.

    Stage configs left empty come from the chain file `config` (read when the run starts). `families` (one
    training config per adapter family, each naming its characters): curation once, then the rest per family, each
    its own MLflow chain run; a list of their summaries. `approve` answers the reviewer step a first champion needs
    (None: wait for a reviewer in the Prefect UI when running against a Prefect server). `gateway_url` None: the
    serving config's gateway."""
    chain = resolve_parameters(config, {
        "curate": curate, "train": train, "evaluate": evaluate, "promotion": promotion, "serving": serving,
        "quantize": quantize, "prefer": prefer, "inputs": inputs, "families": families, "dataset_dir": dataset_dir,
        "deploy": deploy, "start_fleet": start_fleet})
    if chain.families:
        return run_families(chain, gateway_url, approve, approval_comment)
    return run_chain(chain, None, gateway_url, approve, approval_comment)


def run_chain(chain: ChainParameters, curation: Curation | None, gateway_url: str | None, approve: bool | None,
              comment: str) -> ChainSummary:
    """One adapter's chain under its MLflow parent run (curating first unless `curation` is given)."""
    started = time.monotonic()
    parent = open_chain_run(chain)
    try:
        curated, windows = curation or curate_inputs(chain)
        summary = run_stages(parent, chain, curated, windows, gateway_url, approve, comment)
    except BaseException as exc:  # the run ends FAILED with the error; closing it never hides that error
        error = f"{type(exc).__name__}: {exc}"
        close_chain_run(parent, None, error, time.monotonic() - started, return_state=True)
        raise
    return close_chain_run(parent, summary, None, time.monotonic() - started)


def run_families(chain: ChainParameters, gateway_url: str | None, approve: bool | None,
                 comment: str) -> list[ChainSummary]:
    """Curation once, then each adapter family's chain; a family that fails or is refused does not stop the others
    (a failure is raised at the end, naming each)."""
    curation = curate_inputs(chain)
    summaries: list[ChainSummary] = []
    failures: dict[str, BaseException] = {}
    for train in chain.families:
        try:
            summaries.append(run_chain(family_chain(chain, train), curation, gateway_url, approve, comment))
        except Exception as exc:
            failures[train.name] = exc
            get_run_logger().error(f"adapter family {train.name} failed ({type(exc).__name__}: {exc}); the other "
                                   f"families go on")
    get_run_logger().info(families_text(summaries))
    if failures:
        raise families_failed(failures, summaries)
    return summaries


def curate_inputs(chain: ChainParameters) -> Curation:
    """The curated dataset of the chain's inputs, and the production windows among them."""
    windows = [export_production_window(i) for i in chain.inputs if isinstance(i, ProductionInput)]
    files = [i for i in chain.inputs if isinstance(i, str)] + [w.path for w in windows]
    curated = curate_flow(inputs=tuple(files), out_dir=chain.dataset_dir, config=chain.curate)
    return curated, tuple(w.describe() for w in windows)


def run_stages(parent: str, chain: ChainParameters, curated: CuratedDataset, windows: tuple[str, ...],
               gateway_url: str | None, approve: bool | None, comment: str) -> ChainSummary:
    record_stage(parent, "curate", curated.mlflow_run_id, tags={
        "dataset_hash": curated.dataset_hash, "cached": str(curated.cached).lower(),
        **{f"production_window_{n}": w for n, w in enumerate(windows)}})
    trained = train_flow(config=chain.train, dataset_dir=chain.dataset_dir)
    record_stage(parent, "train", trained.mlflow_run_id, tags={"adapter_sha256": trained.adapter_sha256,
                                                               "servable": str(trained.servable).lower()})
    require_servable(trained)
    if chain.prefer is not None:  # the preference adapter, not the SFT one, is the candidate from here on
        trained = prefer_flow(config=preference_stage(chain, trained.adapter_dir), dataset_dir=chain.dataset_dir,
                              sft=chain.train)
        record_stage(parent, "prefer", trained.mlflow_run_id, tags={
            "method": chain.prefer.method, "adapter_sha256": trained.adapter_sha256,
            "servable": str(trained.servable).lower()})
        require_servable(trained)
    champion = find_champion(chain.train.name)
    if champion is not None and champion.tags.get("adapter_sha256") == trained.adapter_sha256:
        decision = keep_champion(parent, champion)
    else:
        decision = evaluate_and_promote(parent, chain, trained, champion, approve, comment)
    deployment = deploy_champion(parent, chain, decision, gateway_url) if chain.deploy and decision.promoted else None
    return record_lineage(parent, chain, curated, trained, decision, deployment, windows)


def evaluate_and_promote(parent: str, chain: ChainParameters, trained: TrainedAdapter, champion: ChampionRef | None,
                         approve: bool | None, comment: str) -> ChainDecision:
    """The candidate against base and champion (an identical earlier evaluation is reused), then the gate."""
    evaluation = cached_evaluation(chain, trained, champion, parent)
    if evaluation is None:
        evaluation = evaluate_flow(config=chain.evaluate, adapter=trained.adapter_dir,
                                   champion=champion.uri if champion else None)
        record_evaluation(parent, evaluation, chain, trained, champion)
    evaluation = register_for_promotion(chain, trained, evaluation)
    quantize_run_id = None
    if chain.quantize is not None:  # evaluated on the quantized base; the policy reads it from the version
        quantized = quantize_flow(config=quantization_for(chain, trained))
        record_stage(parent, "quantize", quantized.mlflow_run_id, note=quantized.table)
        quantize_run_id = quantized.mlflow_run_id
    outcome = promote_flow(candidate=evaluation.registered.uri, policy=chain.promotion, approve=approve,
                           comment=comment, interactive_hint=approval_hint(approve))
    return record_promotion(parent, outcome, evaluation, quantize_run_id)


def deploy_champion(parent: str, chain: ChainParameters, decision: ChainDecision,
                    gateway_url: str | None) -> Deployment:
    """Roll the champion out (a version the gateway already serves at 100% is left alone)."""
    gw = reach_gateway(chain.serving, gateway_url, chain.start_fleet)
    record = already_serving(gw, decision) or deploy_flow(
        adapter=f"models:/{decision.registered_model}/{decision.version}", gateway_url=gw.url,
        config=chain.serving)
    return record_deployment(parent, gw, chain.serving, decision, record)
