"""Every YAML shipped in configs/ validates against its stage schema; bad configs fail naming file, key, reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from charforge.base_models import BaseModelPreset
from charforge.config import ConfigError, load_yaml_model
from charforge.schemas.curate import CurateConfig
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.monitor import MonitorConfig
from charforge.schemas.planning import PlanningConfig
from charforge.schemas.prefer import PreferConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.schemas.retrain import RetrainConfig
from charforge.schemas.serving import ServingConfig
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR, PlatformConfig

# configs/<folder or file> -> schema. lm_eval/ holds lm-eval's own task YAMLs, validated by `lm-eval validate`.
SCHEMAS = {
    "platform.yaml": PlatformConfig,
    "models": BaseModelPreset,
    "curate": CurateConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "promotion.yaml": PromotionPolicy,
    "quantize": QuantizeConfig,
    "promotion_quick.yaml": PromotionPolicy,
    "retrain": RetrainConfig,
    "serving.yaml": ServingConfig,
    "planning.yaml": PlanningConfig,
    "monitor.yaml": MonitorConfig,
    "prefer": PreferConfig,
}
NOT_OURS = {"lm_eval"}


def shipped_configs() -> list[Path]:
    return sorted(p for p in CONFIGS_DIR.rglob("*.yaml") if p.relative_to(CONFIGS_DIR).parts[0] not in NOT_OURS)


def schema_for(path: Path):
    rel = path.relative_to(CONFIGS_DIR)
    return SCHEMAS.get(rel.parts[0]) or SCHEMAS.get(rel.name)


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_shipped_config_validates(path):
    schema = schema_for(path)
    assert schema is not None, f"{path} has no schema registered in tests/test_configs.py"
    load_yaml_model(path, schema)


def test_model_presets_cover_embedded_default_and_production():
    names = {p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml")}
    assert {
        "smollm2-135m-instruct", "llama-3.1-8b-instruct", "llama-3.1-70b-instruct", "mistral-7b-instruct",
        "mixtral-8x7b-instruct", "qwen2.5-7b-instruct", "yi-1.5-34b-chat",
    } <= names


def _preset_text(**overrides) -> str:
    base = (CONFIGS_DIR / "models" / "llama-3.1-8b-instruct.yaml").read_text()
    for old, new in overrides.items():
        base = base.replace(old, new)
    return base


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("context_length:", "contxt_length:", "key 'contxt_length': unknown key, did you mean 'context_length'?"),
        ("max_model_len:", "max_model_length:",  # nested: suggested from the nested model's fields
         "key 'serving.max_model_length': unknown key, did you mean 'max_model_len'?"),
    ],
)
def test_misspelt_key_names_file_key_and_suggestion(tmp_path, old, new, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_preset_text(**{old: new}))
    with pytest.raises(ConfigError) as err:
        load_yaml_model(bad, BaseModelPreset)
    assert f"{bad}: {message}" in str(err.value).splitlines()


def test_wrong_type_names_file_key_and_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_preset_text(**{"num_layers: 32": "num_layers: thirty-two"}))
    with pytest.raises(ConfigError) as err:
        load_yaml_model(bad, BaseModelPreset)
    assert str(err.value) == (
        f"{bad}: key 'num_layers': Input should be a valid integer, unable to parse string as an integer "
        "(got 'thirty-two')"
    )


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_yaml_model(tmp_path / "nope.yaml", PlatformConfig)
    broken = tmp_path / "broken.yaml"
    broken.write_text("ui: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_yaml_model(broken, PlatformConfig)


def test_train_presets_respect_the_fleet_rank_and_name_real_presets():
    from charforge.base_models import load_preset

    for path in sorted((CONFIGS_DIR / "train").glob("*.yaml")):
        cfg = load_yaml_model(path, TrainConfig)
        assert cfg.lora.r <= cfg.max_lora_rank, path
        load_preset(cfg.base_model)
        if cfg.chat_template:
            assert (CONFIGS_DIR.parent / cfg.chat_template).is_file(), path


def test_training_template_renders_exactly_like_the_base_template(base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    template = (CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja").read_text()
    for messages in (
        [{"role": "system", "content": "You are Nell."}, {"role": "user", "content": "Ahoy?"},
         {"role": "assistant", "content": "Aye."}, {"role": "user", "content": "More?"},
         {"role": "assistant", "content": "Nay."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ):
        for prompt in (False, True):
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                              chat_template=template)
    masked = tokenizer.apply_chat_template(messages, chat_template=template, return_assistant_tokens_mask=True,
                                           return_dict=True)
    kept = [t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
    assert tokenizer.decode(kept) == "Hello<|im_end|>"  # loss covers the reply and its end-of-turn token only
