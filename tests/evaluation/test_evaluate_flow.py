"""The evaluate flow end to end: real vLLM serving the SmolLM2 base + a LoRA adapter, real lm-eval runs of the
task folder, parity against HF + PEFT, CIs, MLflow run, report files and the Prefect markdown artifact."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from mlflow import MlflowClient

from charforge.schemas.evaluate import EvalConfig
from flows.evaluate import evaluate
from tasks.evaluation import read_samples
from tasks.parity import ParityError, check_parity

pytestmark = pytest.mark.slow


def test_adapter_is_scored_against_its_base_through_vllm_and_lm_eval(
    smollm2_adapter, tmp_path, monkeypatch, mlflow_store, prefect_harness
):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    cfg = EvalConfig(limit=2, bootstrap_resamples=200, parity={"prompts": 4, "tokens": 4,
                                                                "min_first_token_agreement": 0.5})
    result = evaluate(config=cfg, adapter=str(smollm2_adapter))

    assert set(result["summaries"]) == {"candidate", "base"}
    for target, summary in result["summaries"].items():
        assert set(summary) == set(cfg.tasks), target
        assert "acc_mutual_info" in summary["character_mc"]
        acc = summary["character_mc"]["acc_norm"]
        assert 0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 1 and acc["n"] == 2
        assert summary["character_reply_likelihood"]["bits_per_byte"]["value"] > 0
        assert "persona_effect_bpb" in summary["character_reply_likelihood"]
        gen = summary["character_generation"]
        assert {"char_id_acc", "char_id_macro_f1", "ooc_rate", "style_marker_rate", "persona_margin", "ref_sim",
                "empty_rate", "repetition", "assistant_voice_rate"} <= set(gen)
        assert "boundary_ok" in summary["character_boundaries"]
    assert 0.5 <= result["parity"]["first_token_agreement"] <= 1
    assert result["parity"]["template_source"].endswith("training_chat_template.jinja")

    run_dir = tmp_path / "state" / "evals"
    out = next(run_dir.glob("character-eval-candidate-*"))
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

    client = MlflowClient(mlflow_store)
    run = client.get_run(result["mlflow_run_id"])
    metrics = run.data.metrics
    assert {"eval/character_mc/acc_norm", "eval/character_mc/acc_norm/ci_low", "base/eval/character_mc/acc_norm",
            "eval/character_generation/ooc_rate", "parity/first_token_agreement"} <= set(metrics)
    assert any(k.startswith("eval/character_generation/char_id_acc/") and k.count("/") == 3 and
               not k.endswith(("ci_low", "ci_high")) for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_samples.json", "report.md", "scores.json", "per_character.png", "lm_eval"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval_samples.json")).read())
    assert {"model", "task", "probe", "character", "response"} <= set(table["columns"])
    assert run.data.tags["adapter_sha256"] != "none" and run.data.params["targets"] == "candidate,base"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def markdown():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["character-eval"])))

    import asyncio

    artifacts = asyncio.run(markdown())
    assert any("| character_mc | acc_norm ↑ |" in (a.data or "") for a in artifacts)


def test_template_mismatch_between_training_and_serving_is_an_error(smollm2_adapter, vllm_base, base_model_dir,
                                                                   tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(smollm2_adapter, adapter)
    # A training template that ends turns with <|endoftext|> instead of SmolLM2's <|im_end|>
    template = (adapter / "training_chat_template.jinja").read_text()
    (adapter / "training_chat_template.jinja").write_text(template.replace("<|im_end|>", "<|endoftext|>"))
    conversation = [{"role": "system", "content": "You are Nell Bramwick."}, {"role": "user", "content": "Hello!"}]
    with pytest.raises(ParityError) as err:
        check_parity(adapter_dir=adapter, base_dir=base_model_dir, base_url=vllm_base.url,
                     served_name="smollm2-135m-instruct", conversations=[conversation], tokens=2)
    message = str(err.value)
    assert message.startswith("chat template mismatch between training (")
    assert "first difference at token 10 of 23 (training) / 23 (serving)" in message
    assert "training: '" in message and "<|endoftext|>" in message and "<|im_end|>" in message
    assert httpx.get(f"{vllm_base.url}/health").status_code == 200
