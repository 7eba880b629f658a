"""The retrain chain's config: chain files compose the stage configs into the flow's parameters, and a bad stage
file fails before anything runs, naming it."""

from __future__ import annotations

import pytest

from charforge.config import ConfigError
from charforge.errors import InputError
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import CONFIGS_DIR
from charforge.chain import check_stages, evaluation_key, family_chain, load_chain as chain_parameters, preference_stage


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


def test_adapter_families_are_training_configs_naming_their_characters():
    chain = check_stages(chain_parameters(CONFIGS_DIR / "retrain" / "families.yaml"))
    assert [(f.name, f.characters) for f in chain.families] == [
        ("smollm2-england", ["wat_honeysett", "harriet_fenwick", "ambrose_quill"]),
        ("smollm2-frontier", ["decimus_durus", "korvik_ashmantle", "nell_bramwick"]),
        ("smollm2-new-worlds", ["dot_kincaid", "tamsin_oyelaran"])]
    # each trains with the chain's training config under its own name, and is evaluated on its characters' probes
    assert all(f.model_dump(exclude={"name", "characters"}) == chain.train.model_dump(exclude={"name", "characters"})
               for f in chain.families)
    one = family_chain(chain, chain.families[2])
    assert one.train.name == "smollm2-new-worlds" and one.families == []
    assert one.evaluate.probe_characters == ["dot_kincaid", "tamsin_oyelaran"]
    assert chain.evaluate.probe_characters is None  # the chain's own evaluation: every probe


@pytest.mark.parametrize("families, message", [
    ("[{name: a, characters: [dot_kincaid]}, {name: b, characters: [tamsin_oyelaran, dot_kincaid]}]",
     "key 'families': Value error, character dot_kincaid is in two adapter families: a and b"),
    ("[{name: a, characters: [dot_kincaid]}, {name: a, characters: [tamsin_oyelaran]}]",
     "key 'families': Value error, adapter families named twice: a"),
    ("[{name: a, characters: []}]", "key 'families.0.characters': List should have at least 1 item"),
])
def test_families_that_overlap_or_repeat_are_refused(tmp_path, families, message):
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"families: {families}\n")
    with pytest.raises(ConfigError, match=message):
        chain_parameters(chain)


def test_a_family_without_persona_cards_a_preference_stage_or_room_on_the_replicas_is_refused_before_anything_runs(
        tmp_path):
    import subprocess

    from tests.training.test_train_flow import CHARFORGE

    chain = tmp_path / "chain.yaml"
    chain.write_text("families: [{name: detectives, characters: [ambrose_quill, sherlock_holmes]}]\n")
    result = subprocess.run([CHARFORGE, "retrain", "--config", str(chain)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: adapter family detectives names characters without a persona card in data/characters: "
        "sherlock_holmes (cards: ambrose_quill, decimus_durus, dot_kincaid, harriet_fenwick, korvik_ashmantle, "
        "nell_bramwick, tamsin_oyelaran, wat_honeysett)")
    chain.write_text("families: [{name: detectives, characters: [ambrose_quill]}]\n"
                     "curate: configs/curate/preference.yaml\nprefer: configs/prefer/smollm2_dpo.yaml\n")
    with pytest.raises(InputError, match=r"^the chain has adapter families \(detectives\) and a preference stage "
                                         r"\(smollm2-dpo\): preference tuning per family is not supported; set "
                                         r"`prefer: null` or drop `families`$"):
        check_stages(chain_parameters(chain))
    serving = tmp_path / "serving.yaml"
    serving.write_text("fleet: {max_cpu_loras: 3}\n")
    chain.write_text(f"serving: {serving}\nfamilies: [{{name: a, characters: [dot_kincaid]}}, "
                     f"{{name: b, characters: [tamsin_oyelaran]}}, {{name: c, characters: [nell_bramwick]}}]\n")
    with pytest.raises(InputError) as refused:
        check_stages(chain_parameters(chain))
    assert str(refused.value) == (
        "3 adapter families need 4 adapters resident on every replica during a rollout (each family's champion and "
        "one canary), more than the serving config's fleet.max_cpu_loras (3); set gateway.placement (families placed "
        "on demand, where requests need them), raise fleet.max_cpu_loras or group the characters into fewer families")
    # with on-demand placement a finished family is not kept on every replica: as many families as there are
    serving.write_text("fleet: {max_cpu_loras: 3}\ngateway: {strategy: adapter_affinity, placement: {max_resident: 3}}\n")
    assert [f.name for f in check_stages(chain_parameters(chain)).families] == ["a", "b", "c"]


def test_families_that_fail_are_named_in_one_error_with_their_exit_code():
    from charforge.chain import families_failed
    from charforge.errors import Refused

    unservable = Refused("the adapter cannot be served by the fleet: LoRA rank 64 > max_lora_rank 16")
    one = families_failed({"smollm2-england": unservable}, [])
    assert str(one) == ("adapter families failed: smollm2-england: Refused: the adapter cannot be served by the "
                        "fleet: LoRA rank 64 > max_lora_rank 16") and one.exit_code == 3
    mixed = families_failed({"smollm2-england": unservable, "smollm2-frontier": OSError("No space left on device")},
                            [])
    assert mixed.exit_code == 1 and "smollm2-frontier: OSError: No space left on device" in str(mixed)


def test_families_given_to_the_flow_are_checked_like_a_chain_files():
    """The Prefect form or a deployment hands the flow training configs, not a chain file: the same refusals hold."""
    from pydantic import ValidationError

    from charforge.chain import chain_with
    from charforge.schemas.train import TrainConfig

    nobody = TrainConfig(name="smollm2-nobody")
    with pytest.raises(ValidationError, match="adapter family smollm2-nobody names no characters"):
        chain_with(CONFIGS_DIR / "retrain" / "families.yaml", {"families": [nobody]})
    twice = [TrainConfig(name=n, characters=["dot_kincaid"]) for n in ("a", "b")]
    with pytest.raises(ValidationError, match="character dot_kincaid is in two adapter families: a and b"):
        chain_with(CONFIGS_DIR / "retrain" / "families.yaml", {"families": twice})
