"""The retrain chain's inputs and outputs outside Prefect: a chain file composed into typed stage configs, the key an
evaluation is reused by, and the summary a person reads at the end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from charforge.characters import load_characters
from charforge.config import load_yaml_model
from charforge.errors import CharforgeError, InputError
from charforge.results import ChainSummary
from charforge.schemas.curate import CurateConfig
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.prefer import PreferConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.schemas.retrain import FamilySpec, ProductionInput, RetrainConfig, require_families_apart
from charforge.schemas.serving import ServingConfig
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR, repo_path

DEFAULT_CHAIN = CONFIGS_DIR / "retrain" / "default.yaml"


class ChainParameters(BaseModel):
    """Every stage config of one chain run, loaded and validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    curate: CurateConfig
    train: TrainConfig
    evaluate: EvalConfig
    promotion: PromotionPolicy
    serving: ServingConfig
    quantize: QuantizeConfig | None = None
    prefer: PreferConfig | None = None
    inputs: list[str | ProductionInput]
    dataset_dir: str
    deploy: bool
    start_fleet: bool
    families: list[TrainConfig] = []  # one training config per adapter family (each naming its characters)

    @model_validator(mode="after")
    def _families_apart(self) -> "ChainParameters":
        """The same checks as a chain file's, for families given to the flow (a Prefect form, a deployment)."""
        require_families_apart([(f.name, f.characters) for f in self.families])
        return self


STAGE_SCHEMAS = {"curate": CurateConfig, "train": TrainConfig, "evaluate": EvalConfig,
                 "promotion": PromotionPolicy, "serving": ServingConfig}


def load_chain(path: Path) -> ChainParameters:
    """A `configs/retrain/*.yaml` file with its stage files loaded and validated (a bad one is named)."""
    cfg = load_yaml_model(path, RetrainConfig)
    stages = {stage: load_yaml_model(repo_path(getattr(cfg, stage)), schema) for stage, schema in STAGE_SCHEMAS.items()}
    quantize = load_yaml_model(repo_path(cfg.quantize), QuantizeConfig) if cfg.quantize else None
    prefer = load_yaml_model(repo_path(cfg.prefer), PreferConfig) if cfg.prefer else None
    families = [family_config(spec, stages["train"]) for spec in cfg.families]
    return ChainParameters(**stages, quantize=quantize, prefer=prefer, inputs=list(cfg.inputs),
                           dataset_dir=cfg.dataset_dir, deploy=cfg.deploy, start_fleet=cfg.start_fleet,
                           families=families)


def family_config(spec: FamilySpec, template: TrainConfig) -> TrainConfig:
    """A family's training config: its own file, or the chain's, under the family's name and characters."""
    base = load_yaml_model(repo_path(spec.train), TrainConfig) if spec.train else template
    return TrainConfig.model_validate({**base.model_dump(), "name": spec.name, "characters": spec.characters})


def family_chain(chain: ChainParameters, train: TrainConfig) -> ChainParameters:
    """One family's chain: its training config, evaluated on its characters' probes; the rest shared."""
    evaluate = chain.evaluate.model_copy(update={"probe_characters": train.characters})
    return chain.model_copy(update={"train": train, "evaluate": evaluate, "families": []})


def check_stages(chain: ChainParameters) -> ChainParameters:
    """What no single stage config can see: the preference stage needs the pairs curation writes; adapter families
    need persona cards for their characters (and are not preference-tuned yet)."""
    if chain.prefer is not None and not chain.curate.pairs.enabled:
        raise InputError(f"the chain has a preference stage ({chain.prefer.name}, {chain.prefer.method}) but its "
                         f"curate config writes no pairs; set `pairs: {{enabled: true}}` in the curate config")
    if chain.families and chain.prefer is not None:
        raise InputError(f"the chain has adapter families ({', '.join(f.name for f in chain.families)}) and a "
                         f"preference stage ({chain.prefer.name}): preference tuning per family is not supported; "
                         f"set `prefer: null` or drop `families`")
    fleet = chain.serving.fleet
    if (chain.families and chain.deploy and fleet.enable_lora and chain.serving.gateway.placement is None
            and len(chain.families) + 1 > fleet.max_cpu_loras):
        raise InputError(f"{len(chain.families)} adapter families need {len(chain.families) + 1} adapters resident on "
                         f"every replica during a rollout (each family's champion and one canary), more than the "
                         f"serving config's fleet.max_cpu_loras ({fleet.max_cpu_loras}); set gateway.placement "
                         f"(families placed on demand, where requests need them), raise fleet.max_cpu_loras or "
                         f"group the characters into fewer families")
    if chain.families:
        cards = set(load_characters(repo_path(chain.evaluate.characters)))
        for family in chain.families:
            unknown = sorted(set(family.characters or ()) - cards)
            if unknown:
                raise InputError(f"adapter family {family.name} names characters without a persona card in "
                                 f"{chain.evaluate.characters}: {', '.join(unknown)} "
                                 f"(cards: {', '.join(sorted(cards))})")
    return chain


def preference_stage(chain: ChainParameters, sft_adapter: str) -> PreferConfig:
    """The chain's preference config on the SFT adapter it just trained and its dataset, under the training config's
    name: the preference adapter is a version of the family the fleet serves and the champion is looked up in."""
    assert chain.prefer is not None
    return chain.prefer.model_copy(update={"adapter": sft_adapter, "dataset_dir": Path(chain.dataset_dir),
                                           "name": chain.train.name})


def chain_with(path: Path, overrides: dict[str, object]) -> ChainParameters:
    """The chain file's parameters, with every override that is not None in their place (what the flow was
    given: a Prefect form, a deployment's parameters, a test)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    base = load_chain(path) if len(given) < len(ChainParameters.model_fields) else None
    merged = {**(base.model_dump() if base is not None else {}), **{
        k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in given.items()}}
    return ChainParameters.model_validate(merged)


def evaluation_key(evaluate: EvalConfig, adapter_sha: str, champion_sha: str | None) -> str:
    """What an evaluation in the chain depends on: the same adapter, against the same champion, same config."""
    payload = json.dumps([evaluate.model_dump(mode="json"), adapter_sha, champion_sha], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def summary_text(s: ChainSummary, mlflow_ui: str, prefect_ui: str) -> str:
    """What a person needs after a chain run: the table, the decision, where it is served, where to look."""
    lines = [f"\n== retrain: {s.registered_model} version {s.version} "
             f"({'champion' if s.promoted else 'NOT promoted'}) ==",
             f"dataset {s.dataset_hash[:12]} (curation {'cached' if s.curation_cached else 'ran'}), "
             f"adapter {s.adapter_sha256[:12]}", "", s.eval_table, "promotion decision:",
             *[f"  - {r}" for r in s.reasons], "", f"MLflow chain run: {s.chain_run_url}"]
    if s.prefect_flow_run_url:
        lines.append(f"Prefect flow run: {s.prefect_flow_run_url}")
    lines.append(f"MLflow / Prefect UIs: {mlflow_ui} / {prefect_ui} (`charforge ui` serves both)")
    if s.gateway_url:
        lines += [f"gateway: {s.gateway_url} serves {s.served_name} on {len(s.replicas)} replica(s) "
                  f"(status: charforge serve status; stop: charforge serve down)", "", try_it(s)]
    return "\n".join(lines)


class FamiliesFailed(CharforgeError):
    """Adapter families whose stages raised, after the other families ran to the end."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def families_failed(failures: dict[str, BaseException], done: list[ChainSummary]) -> FamiliesFailed:
    """One error naming each failed family; its exit code is theirs when they agree (3: every one was refused)."""
    codes = {getattr(exc, "exit_code", 1) for exc in failures.values()}
    failed = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures.items())
    others = ", ".join(f"{s.registered_model} v{s.version} {family_outcome(s)}" for s in done)
    return FamiliesFailed(f"adapter families failed: {failed}" + (f" (the others ran: {others})" if others else ""),
                          codes.pop() if len(codes) == 1 else 1)


def family_outcome(s: ChainSummary) -> str:
    if s.reasons == ("already champion",):
        return "unchanged (its rows and training config as before: not retrained, evaluated or rolled out)"
    if not s.promoted:
        return "NOT promoted (refused by the gate)"
    return "champion" + (f", served as {s.served_name} ({s.rollout})" if s.served_name else "")


def families_text(summaries: list[ChainSummary]) -> str:
    """One line per adapter family after their summaries: what each chain run decided."""
    return "\n".join(["", "== adapter families ==",
                      *[f"  {s.registered_model} version {s.version}: {family_outcome(s)}" for s in summaries]])


def try_it(s: ChainSummary) -> str:
    """Ready-to-paste requests to the gateway: curl and the openai client."""
    url, route, key_env = s.gateway_url, s.example_route, s.api_key_env
    auth = f' -H "Authorization: Bearer ${key_env}"' if key_env else ""
    key = f'os.environ.get("{key_env}", "none")' if key_env else '"none"'
    body = json.dumps({"model": route, "messages": [{"role": "user", "content": "Who are you, and what is your day like?"}],
                       "max_tokens": 80})
    return (f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n\n"
            f".venv/bin/python -c 'import os, openai; c = openai.OpenAI(base_url=\"{url}/v1\", api_key={key}); "
            f"print(c.chat.completions.create(model=\"{route}\", messages=[{{\"role\": \"user\", \"content\": "
            f"\"Who are you?\"}}]).choices[0].message.content)'")
