"""The retrain chain's config: chain files compose the stage configs into the flow's parameters, and a bad stage
file fails before anything runs, naming it."""

from __future__ import annotations

import pytest

from charforge.config import ConfigError
from charforge.errors import InputError
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import CONFIGS_DIR
from charforge.chain import check_stages, evaluation_key, load_chain as chain_parameters, preference_stage


def test_chain_files_become_the_flow_parameters():
    demo = chain_parameters(CONFIGS_DIR / "retrain" / "demo.yaml")
    nightly = chain_parameters(CONFIGS_DIR / "retrain" / "default.yaml")
    assert demo.evaluate.limit == 32 and nightly.evaluate.limit is None
    assert demo.train.name == nightly.train.name == "smollm2-lora"
    assert demo.inputs == ["data/raw"] and demo.deploy and demo.start_fleet
    assert demo.quantize is None


def test_quantization_is_one_line_in_the_chain_file(tmp_path):
    chain = tmp_path / "chain.yaml"
    chain.write_text("evaluate: configs/eval/quick.yaml\nquantize: configs/quantize/cpu_w4a16_rtn.yaml\n")
    params = chain_parameters(chain)
    assert params.quantize.mode == "multi_lora" and params.evaluate.limit == 32


def test_a_bad_stage_file_is_named(tmp_path):
    bad_eval = tmp_path / "eval.yaml"
    bad_eval.write_text("limt: 3\n")
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"evaluate: {bad_eval}\n")
    with pytest.raises(ConfigError, match=f"{bad_eval}: key 'limt': unknown key, did you mean 'limit'?"):
        chain_parameters(chain)
    chain.write_text("evaluat: configs/eval/quick.yaml\n")
    with pytest.raises(ConfigError, match="key 'evaluat': unknown key, did you mean 'evaluate'?"):
        chain_parameters(chain)


def test_an_evaluation_is_reused_only_for_the_same_adapter_champion_and_config():
    quick, full = EvalConfig(limit=32), EvalConfig()
    key = evaluation_key(quick, "a" * 64, None)
    assert key == evaluation_key(EvalConfig(limit=32), "a" * 64, None)
    assert len({key, evaluation_key(full, "a" * 64, None), evaluation_key(quick, "b" * 64, None),
                evaluation_key(quick, "a" * 64, "c" * 64)}) == 4


def test_a_preference_stage_needs_pairs_and_builds_on_the_chains_own_adapter(tmp_path):
    params = check_stages(chain_parameters(CONFIGS_DIR / "retrain" / "preference.yaml"))
    assert params.prefer.method == "dpo" and params.curate.pairs.enabled
    stage = preference_stage(params, "/runs/sft/adapter")  # the SFT adapter the chain just trained
    assert (stage.adapter, str(stage.dataset_dir), stage.name) == ("/runs/sft/adapter", ".state/datasets/default",
                                                                   "smollm2-lora")  # the family the fleet serves
    no_pairs = tmp_path / "curate.yaml"
    no_pairs.write_text("pairs: {enabled: false}\n")
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"curate: {no_pairs}\nprefer: configs/prefer/smollm2_kto.yaml\n")
    with pytest.raises(InputError) as err:
        check_stages(chain_parameters(chain))
    assert str(err.value) == ("the chain has a preference stage (smollm2-kto, kto) but its curate config writes no "
                              "pairs; set `pairs: {enabled: true}` in the curate config")
    assert chain_parameters(CONFIGS_DIR / "retrain" / "default.yaml").prefer is None
