"""Each served artifact is scored once: the evaluate flow, run for real twice against one MLflow store, reuses the
first run's scores in the second, whatever role the model plays there, and says so in MLflow and the report. That
any other input is another key (so another score) is checked input by input in test_score_cache.py.

The second run is also the suite's evaluation of a candidate against a champion (the champion is the same adapter
under another served name, so its scores come from the first run's candidate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charforge.schemas.evaluate import EvalConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path, monkeypatch, base_model_dir, mlflow_store):
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    (state / "models" / base_model_dir.name).symlink_to(base_model_dir)  # the verified base, not a rebuild
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(state))
    return mlflow_store


def test_a_second_evaluation_reuses_every_score_the_first_made_and_names_its_source(store, smollm2_adapter,
                                                                                  prefect_api):
    from mlflow import MlflowClient

    from flows.evaluate import evaluate

    cfg = EvalConfig(limit=1, bootstrap_resamples=100, register_version=False,
                     # log-likelihood tasks only: generation scores are reused the same way (the flawed-candidate
                     # chain test reuses its base's and champion's), at 80 tokens per reply more
                     tasks=["character_reply_likelihood", "character_reply_likelihood_nopersona"],
                     parity={"prompts": 2, "tokens": 2, "min_first_token_agreement": 0.5},
                     serving={"speed_tokens": 4})
    first = evaluate(cfg, adapter=str(smollm2_adapter))
    assert first.reused_scores == {} and set(first.summaries) == {"candidate", "base"}

    second = evaluate(cfg, adapter=str(smollm2_adapter), champion=str(smollm2_adapter))
    assert second.reused_scores == {"candidate": first.mlflow_run_id, "base": first.mlflow_run_id,
                                    "champion": first.mlflow_run_id}
    assert second.summaries["candidate"] == second.summaries["champion"] == first.summaries["candidate"]
    assert second.summaries["base"] == first.summaries["base"]
    # Nothing was sent to lm-eval the second time: its files are the first run's, copied; with every score and the
    # candidate's parity check already made, no vLLM server was started at all
    run_dir = Path(second.run_dir)
    assert not (run_dir / "vllm.log").exists() and (Path(first.run_dir) / "vllm.log").exists()
    assert second.parity == first.parity and second.serving == pytest.approx(first.serving)
    for role, source in (("candidate", "candidate"), ("champion", "candidate"), ("base", "base")):
        assert json.loads((run_dir / "lm_eval" / role / "per_probe.json").read_text()) == json.loads(
            (Path(first.run_dir) / "lm_eval" / source / "per_probe.json").read_text())

    client = MlflowClient()
    tags = client.get_run(second.mlflow_run_id).data.tags
    assert tags["scores.base.reused_from"] == tags["scores.champion.reused_from"] == first.mlflow_run_id
    assert tags["score_key.candidate"] == tags["score_key.champion"] == client.get_run(
        first.mlflow_run_id).data.tags["score_key.candidate"]
    assert f"Scores of base reused from evaluation run `{first.mlflow_run_id}`" in Path(second.report).read_text()
    metrics = client.get_run(second.mlflow_run_id).data.metrics
    assert metrics["champion/eval/character_reply_likelihood/bits_per_byte"] == metrics[
        "eval/character_reply_likelihood/bits_per_byte"]

