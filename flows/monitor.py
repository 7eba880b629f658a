"""Monitor flow: the replies captured at the gateway in the last window, judged per route and served version with the
evaluation's character judges; one MLflow run per window, the figures on the gateway's /metrics, and a Prefect event
when a limit is crossed (once per cooldown), which the automations in prefect.yaml act on; and an event when enough
replies have been rated up since the last production window a retrain curated.

Run it:  charforge monitor [--config configs/monitor.yaml]      or the hourly `monitor/hourly` deployment.
"""

from __future__ import annotations

import time

from prefect import flow

from charforge.clock import utc
from charforge.results import MonitorSummary
from charforge.schemas.monitor import MonitorConfig
from tasks.monitor import (announce_drift, announce_new_ratings, gateway_url, judge_window, load_configs, log_window,
                           publish_on_gateway)


@flow(name="monitor")
def monitor(config: MonitorConfig | None = None, config_file: str = "configs/monitor.yaml",
            serving_file: str = "configs/serving.yaml", until: float | None = None) -> MonitorSummary:
    """Judge the last `window_minutes` of captured replies (ending at `until`, default now) and announce drift."""
    cfg, serving = load_configs(config, config_file, serving_file)
    end = until or time.time()
    since = end - cfg.window_minutes * 60
    judgements = judge_window(cfg, since, end)
    run_id = log_window(cfg, judgements, since, end)
    publish_on_gateway(serving, judgements)
    events = announce_drift(cfg, judgements, end, gateway_url(serving))
    return MonitorSummary(since=utc(since), until=utc(end), judgements=judgements, events=events,
                          feedback=announce_new_ratings(cfg, end), mlflow_run_id=run_id)
