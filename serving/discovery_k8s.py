"""Fleet discovery on Kubernetes: the replicas are the ready vLLM pods matching a label selector.

The gateway runs in the cluster under a service account allowed to list pods (deploy/k8s/gateway.yaml has the
Role). It reads the pod list from the API server the way every in-cluster client does: the service account token
and CA under /var/run/secrets/kubernetes.io/serviceaccount and KUBERNETES_SERVICE_HOST/PORT. Pods are addressed by
IP, not through the Service, because the gateway itself chooses the replica (per-version loaded adapters, least
outstanding requests); the Service is for anything else that wants "some replica".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from charforge.errors import InputError
from charforge.http import bearer
from charforge.schemas.serving import KubernetesDiscovery

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class DiscoveryError(InputError):
    """The pod list could not be read; the message says what to fix."""


def ready_replicas(pod_list: dict, port: int) -> dict[str, str]:
    """{pod name: base URL} for pods that are Running, Ready, not being deleted and have an IP; sorted by name."""
    found = {}
    for pod in pod_list.get("items", []):
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        if status.get("phase") == "Running" and ready and status.get("podIP") and not meta.get("deletionTimestamp"):
            ip = status["podIP"]
            found[meta["name"]] = f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"  # IPv6 in brackets
    return dict(sorted(found.items()))


@dataclass
class InCluster:
    """How to reach the API server from inside a pod."""

    api_url: str
    token_file: Path  # re-read per request: projected service account tokens rotate
    ca_file: Path
    namespace: str

    @classmethod
    def load(cls, root: Path = SERVICE_ACCOUNT) -> "InCluster":
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (root / "token").is_file():
            raise DiscoveryError("fleet.discovery is kubernetes but this process is not in a pod with a service "
                                 f"account (no KUBERNETES_SERVICE_HOST or {root / 'token'})")
        return cls(f"https://{host}:{port}", root / "token", root / "ca.crt", (root / "namespace").read_text().strip())


def list_pods(client: httpx.Client, api_url: str, namespace: str, selector: str, token: str) -> dict:
    """GET /api/v1/namespaces/<ns>/pods?labelSelector=...; a refusal names the missing permission."""
    r = client.get(f"{api_url}/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector},
                   headers=bearer(token), timeout=10)
    if r.status_code in (401, 403):
        raise DiscoveryError(f"the API server refused to list pods in {namespace!r} ({r.status_code}): the "
                             "gateway's service account needs a Role with get/list on pods "
                             "(deploy/k8s/gateway.yaml)")
    r.raise_for_status()
    return r.json()


class PodDiscovery:
    """The gateway's replica source: re-reads the pod list at most every `refresh_s` seconds."""

    def __init__(self, settings: KubernetesDiscovery, cluster: InCluster | None = None,
                 client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.cluster = cluster or InCluster.load()
        self.namespace = settings.namespace or self.cluster.namespace
        self.client = client or httpx.Client(verify=str(self.cluster.ca_file))
        self._last: dict[str, str] = {}
        self._read_at = float("-inf")

    def replicas(self) -> dict[str, str]:
        if time.monotonic() - self._read_at < self.settings.refresh_s:
            return self._last
        pods = list_pods(self.client, self.cluster.api_url, self.namespace, self.settings.label_selector,
                         self.cluster.token_file.read_text().strip())
        self._last, self._read_at = ready_replicas(pods, self.settings.port), time.monotonic()
        return self._last
