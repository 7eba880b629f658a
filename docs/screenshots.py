"""The README's screenshots, taken with headless Chromium (Debian package `chromium`) from a running `charforge ui`.

    .venv/bin/charforge ui &          # after a chain run (make demo)
    .venv/bin/python docs/screenshots.py

Writes docs/img/prefect-retrain-form.png (the `retrain/nightly` deployment's custom-run form),
docs/img/mlflow-compare.png (MLflow's compare view of the newest chain run's candidate / base / champion runs) and,
when the registry holds a version the gate refused (e.g. after `tests/test_retrain_chain.py`'s looping candidate, or
a `charforge promote` that refused), docs/img/refused-version.png (its registry page: the one-line decision and the
link to the promotion run) and docs/img/where-worse.png (that run's `where_worse.json` in MLflow's table view).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium: apt-get install chromium")


def shoot(url: str, out: Path, size: str = "1440,1500", wait_ms: int = 25000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    print(f"{out.relative_to(ROOT)} <- {url}")


def prefect_form_url(prefect: str) -> str:
    deployment = httpx.get(f"{prefect}/api/deployments/name/retrain/nightly", timeout=10).json()
    return f"{prefect}/deployments/deployment/{deployment['id']}/run"


def mlflow_compare_url(mlflow: str) -> str:
    from mlflow import MlflowClient

    from charforge.settings import platform

    c = MlflowClient(platform().tracking_uri)
    experiment = c.get_experiment_by_name(f"{platform().mlflow.experiment_prefix}-retrain")
    parents = c.search_runs([experiment.experiment_id], "tags.stage = 'retrain'", order_by=["start_time DESC"])
    for parent in parents:
        evaluate = c.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                 "and tags.stage = 'evaluate'")
        if not evaluate:
            continue
        models = c.search_runs([experiment.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{evaluate[0].info.run_id}'")
        if len(models) >= 2:
            runs = quote(json.dumps([m.info.run_id for m in models]))
            return f"{mlflow}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment.experiment_id]))}"
    raise SystemExit("no chain run with an evaluation yet: run `make demo` first")


def refused_version_urls(mlflow: str) -> tuple[str, str] | None:
    """The newest refused version's registry page and its promotion run's where_worse.json, or None."""
    from mlflow import MlflowClient

    from charforge.settings import platform

    c = MlflowClient(platform().tracking_uri)
    refused = [v for v in c.search_model_versions() if v.tags.get("promotion_decision") == "reject"
               and v.tags.get("promotion_run_id")]
    if not refused:
        return None
    version = max(refused, key=lambda v: v.last_updated_timestamp)
    run = c.get_run(version.tags["promotion_run_id"])
    return (f"{mlflow}/#/models/{quote(version.name)}/versions/{version.version}",
            f"{mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/where_worse.json")


def main() -> None:
    from charforge.settings import platform

    ui = platform().ui
    prefect, mlflow = f"http://{ui.host}:{ui.prefect_port}", f"http://{ui.host}:{ui.mlflow_port}"
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    shoot(prefect_form_url(prefect), out / "prefect-retrain-form.png")
    shoot(mlflow_compare_url(mlflow), out / "mlflow-compare.png")
    refused = refused_version_urls(mlflow)
    if refused is None:
        print("no refused version in the registry: refused-version.png and where-worse.png not taken")
        return
    shoot(refused[0], out / "refused-version.png", size="1900,900")
    shoot(refused[1], out / "where-worse.png", size="1900,700")


if __name__ == "__main__":
    main()
