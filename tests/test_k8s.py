"""Kubernetes packaging: the manifests in k8s/, the injection webhook over real HTTPS
on loopback, and `conduit-sidecar inject -f`.

Schema validation uses kubernetes-validate in strict mode (unknown fields are errors)
against Kubernetes 1.29, the first release with native sidecars on by default, and
1.33. It has no schemas for custom resources (PodMonitor, cert-manager's Issuer and
Certificate): it warns and passes them, so these tests require that exactly those
kinds went unvalidated and check their fields against the objects they refer to.
Schemas do not check enum values either (failurePolicy, sideEffects, the sidecar's
restartPolicy...); the tests assert them.

Patches are applied twice, by the `jsonpatch` package and by
`kubectl patch --local --type=json` (no cluster involved), and must agree.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import http.client
import json
import os
import pathlib
import shutil
import socket
import ssl
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from conftest import SidecarProcess, held_port, socket_buffers, standard_keys, switching_protocols

from conduit_sidecar import config as config_mod
from conduit_sidecar.k8s.inject import DEFAULT_IMAGE, Settings, sidecar_container
from conduit_sidecar.k8s.webhook import MAX_BODY, REQUEST_DEADLINE
from conduit_sidecar.keys import load_keys
from conduit_sidecar.testing import CA, throwaway_certs

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S_VERSIONS = ["1.29.0", "1.33.0"]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
CLI = [sys.executable, "-m", "conduit_sidecar"]
SIDECAR_IMAGE = "registry.example.com/conduit-sidecar:9.9.9"

# Directory -> the custom resources it holds, which kubernetes-validate cannot check.
K8S_DIRS = {
    "k8s/base": {"PodMonitor"},
    "k8s/tls": {"PodMonitor"},
    "k8s/injector": {"Issuer", "Certificate"},
    "k8s/injector/webhook": set(),
}


# --- helpers -------------------------------------------------------------------

def kustomize(directory: str) -> str:
    return subprocess.run([KUBECTL, "kustomize", str(ROOT / directory)], check=True,
                          capture_output=True, text=True, timeout=30).stdout


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate(obj: dict) -> None:
    """Strict schema validation for every Kubernetes version we support."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def pod_template(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def named(items: list[dict] | None, name: str) -> list[dict]:
    return [i for i in items or [] if i.get("name") == name]


def by_name(items: list[dict]) -> list[dict]:
    """A list of named things, in name order (strategic merge may reorder them)."""
    return sorted(items, key=lambda i: i.get("name") or str(i.get("containerPort")))


def normalized(container: dict) -> dict:
    c = copy.deepcopy(container)
    for key in ("env", "ports", "volumeMounts"):
        c[key] = by_name(c[key])
    return c


def check_injected(pod: dict, *, tls: bool = False, native: bool = True,
                   image: str = SIDECAR_IMAGE) -> dict:
    """Assert the sidecar and its volumes are in `pod` exactly once; return the sidecar."""
    spec = pod["spec"]
    holder, other = ("initContainers", "containers") if native else ("containers", "initContainers")
    sidecars = named(spec.get(holder), "conduit-sidecar")
    assert len(sidecars) == 1 and not named(spec.get(other), "conduit-sidecar")
    sidecar = sidecars[0]
    if native:
        assert spec["initContainers"][0] is sidecar        # first: up before the rest
        assert sidecar["restartPolicy"] == "Always"
    else:
        assert "restartPolicy" not in sidecar
    assert sidecar["image"] == image
    assert pod["metadata"]["annotations"]["conduit.dev/status"] == "injected"

    volumes = {v["name"]: v for v in spec["volumes"]}
    assert len(volumes) == len(spec["volumes"])
    assert volumes["conduit-keys"]["secret"]["secretName"]
    assert volumes["conduit-providers"]["secret"]["secretName"]
    assert volumes["conduit-config"]["configMap"]["name"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert len(mounts) == len(sidecar["volumeMounts"])
    assert mounts["conduit-keys"] == {"name": "conduit-keys", "mountPath": "/etc/conduit/keys",
                                      "readOnly": True}                   # a directory: no subPath
    assert mounts["conduit-config"]["mountPath"] == "/etc/conduit/config"
    assert mounts["conduit-providers"]["mountPath"] == "/etc/conduit/providers"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == "conduit-metrics"
    assert "conduit-metrics" in {p["name"] for p in sidecar["ports"]}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["runAsUser"] == 10001
    assert sidecar["securityContext"]["capabilities"]["drop"] == ["ALL"]

    env = {e["name"]: e["value"] for e in sidecar["env"]}
    tls_env = {"CONDUIT_TLS_SELF_SIGNED": "1", "CONDUIT_TLS_LISTEN": "127.0.0.1:8443",
               "CONDUIT_TLS_CA_OUT": "/var/run/conduit/ca.pem",
               "CONDUIT_TLS_STATE_DIR": "/var/run/conduit-private"}
    apps = [c for c in spec["containers"] if c["name"] != "conduit-sidecar"]
    if tls:
        assert tls_env.items() <= env.items()
        assert volumes["conduit-ca"] == {"name": "conduit-ca", "emptyDir": {"sizeLimit": "1Mi"}}
        assert volumes["conduit-private"]["emptyDir"]["medium"] == "Memory"
        assert mounts["conduit-ca"] == {"name": "conduit-ca", "mountPath": "/var/run/conduit"}
        assert mounts["conduit-private"] == {"name": "conduit-private",
                                             "mountPath": "/var/run/conduit-private"}
        for app in apps:
            assert named(app["volumeMounts"], "conduit-ca") == [
                {"name": "conduit-ca", "mountPath": "/var/run/conduit", "readOnly": True}]
            assert len(named(app["env"], "NODE_EXTRA_CA_CERTS")) == 1
        for c in apps + [c for c in spec.get("initContainers", []) if c is not sidecar]:
            assert not named(c.get("volumeMounts"), "conduit-private")   # the CA key: sidecar only
    else:
        assert not tls_env.keys() & env.keys()
        assert not volumes.keys() & {"conduit-ca", "conduit-private"}
        for app in apps:
            assert not named(app.get("env"), "NODE_EXTRA_CA_CERTS")
            assert not named(app.get("volumeMounts"), "conduit-ca")
    return sidecar


# --- the manifests ---------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", sorted(K8S_DIRS))
def test_manifests_validate(directory, version):
    text = kustomize(directory)
    docs = docs_of(text)
    run = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, "-"],
                         input=text, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))], run.stdout
    unvalidated = {line.split("for kind ")[1].split()[0] for line in lines if line.startswith("WARN")}
    assert unvalidated == K8S_DIRS[directory], run.stdout
    passed = [line for line in lines if " passed for resource " in line]
    assert len(passed) == len([d for d in docs if d["kind"] not in K8S_DIRS[directory]])


@needs_kubectl
def test_strict_validation_rejects_native_sidecar_before_1_28():
    """Control: the validator does bite. Container.restartPolicy (native sidecars)
    came in 1.28, so strict validation against 1.27 must reject k8s/base."""
    deployment = find(docs_of(kustomize("k8s/base")), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(deployment, "1.27.0", strict=True)


@needs_kubectl
def test_base_deployment_is_what_the_injector_makes():
    docs = docs_of(kustomize("k8s/base"))
    deployment = find(docs, "Deployment", "example-app")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar == sidecar_container(Settings(image=DEFAULT_IMAGE))
    assert sidecar["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] > 25          # drain_seconds
    # The injector's helper agrees with the hand-written pod, bar the status annotation.
    injected = check_injected({"metadata": {"annotations": {"conduit.dev/status": "injected"}},
                               "spec": spec}, image=DEFAULT_IMAGE)
    assert injected is sidecar

    configmap = find(docs, "ConfigMap", "conduit-config")
    keys = find(docs, "Secret", "conduit-keys")
    find(docs, "Secret", "conduit-provider")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["conduit-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["conduit-keys"]["secret"]["secretName"] == keys["metadata"]["name"]
    assert volumes["conduit-providers"]["secret"]["secretName"] == "conduit-provider"

    monitor = find(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in sidecar["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_injected_sidecar_has_no_prestop_drain():
    """The kubelet runs a native sidecar's preStop when the pod starts to end, while
    the app still runs, and sends SIGTERM only after the app exited: the preStop that
    POSTed /drain refused the app's new sessions for the rest of its shutdown, and an
    idle sidecar exited at once. SIGTERM drains on its own."""
    for native in (True, False):
        container = sidecar_container(Settings(native_sidecar=native))
        assert "lifecycle" not in container
    env = {e["name"]: e["value"] for e in sidecar_container(Settings())["env"]}
    assert env["CONDUIT_ADMIN_LISTEN"].startswith("*:")   # probes and Prometheus, IPv4 and IPv6


def load_pod_config(docs: list[dict], tmp_path: pathlib.Path) -> config_mod.Config:
    """The config the sidecar of the example Deployment loads: the ConfigMap's
    config.toml and the key file Secret, with the environment the pod sets."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(find(docs, "ConfigMap", "conduit-config")["data"]["config.toml"])
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(find(docs, "Secret", "conduit-keys")["stringData"]["keys.json"])
    sidecar = find(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["CONDUIT_CONFIG"] == "/etc/conduit/config/config.toml"
    assert env["CONDUIT_KEYS_FILE"] == "/etc/conduit/keys/keys.json"
    return config_mod.load(environ={**env, "CONDUIT_CONFIG": str(config_file),
                                    "CONDUIT_KEYS_FILE": str(keys_file)})


@needs_kubectl
def test_base_config_and_key_file_load(tmp_path):
    conf = load_pod_config(docs_of(kustomize("k8s/base")), tmp_path)
    assert conf.admin_listen == "*:9464" and conf.listen == "127.0.0.1:8080"
    assert conf.providers["openai"].secret_file == "/etc/conduit/providers/openai"
    assert conf.tls is None
    assert len(load_keys(conf.keys_file)) == 0


FLOOD_PAYLOAD = 64000


class Flood(asyncio.Protocol):
    """One end of a session that reads nothing and sends binary frames without end,
    as fast as its transport takes them (`full`: its own buffer is past its mark, so
    everything between it and its reader is full). With a `request`, a client that
    sends it and waits for the 101 (`opened`); without, a provider that answers the
    sidecar's upgrade request with a 101."""

    def __init__(self, frame: bytes, request: bytes = b""):
        self.frame, self.request = frame * 16, request
        self.head = b""
        self.opened = asyncio.get_running_loop().create_future()
        self.full = asyncio.Event()

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=1 << 20)
        transport.write(self.request)

    def data_received(self, data):
        if self.opened.done():
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.transport.pause_reading()
        if not self.request:            # an upstream: the sidecar's upgrade request
            self.transport.write(switching_protocols(self.head))
        elif not self.head.startswith(b"HTTP/1.1 101 "):
            self.opened.set_exception(ConnectionError(self.head[:100]))
            return
        self.opened.set_result(None)
        self.pump()

    def pump(self):
        while not self.full.is_set():
            self.transport.write(self.frame)

    def pause_writing(self):
        self.full.set()

    def resume_writing(self):
        self.full.clear()
        self.pump()


async def sessions_at_their_bound(sidecar: SidecarProcess, upstream_port: int, context: ssl.SSLContext,
                                  n: int) -> tuple[int, int]:
    """The sidecar's RSS growth and the kernel's memory for its sockets, in bytes, from
    `n` sessions whose client and provider both send without end and read nothing:
    each holds what the relay lets a session hold (its write buffers up to their
    high-water marks, a read past them, TLS records) and what its sockets' kernel
    buffers take, however long the peers go on."""
    loop = asyncio.get_running_loop()
    providers: list[Flood] = []
    unmasked = bytes([0x82, 127]) + struct.pack("!Q", FLOOD_PAYLOAD) + b"\0" * FLOOD_PAYLOAD
    masked = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", FLOOD_PAYLOAD) + b"\0" * (4 + FLOOD_PAYLOAD)

    def provider():
        providers.append(Flood(unmasked))
        return providers[-1]

    server = await loop.create_server(provider, "127.0.0.1", upstream_port, ssl=context)
    request = (f"GET /v1/realtime/connect?provider=flood&model=m HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{sidecar.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {sidecar.keys.plain['good']}\r\n"
               "\r\n").encode()
    before = proc_status(sidecar.proc.pid)[0]
    clients = []
    try:
        for _ in range(n):
            _, client = await loop.create_connection(lambda: Flood(masked, request),
                                                     "127.0.0.1", sidecar.port)
            clients.append(client)
            await client.opened
        for end in clients + providers:
            await end.full.wait()
        await asyncio.sleep(1)      # the sidecar's last reads land in its buffers
        assert all(end.full.is_set() for end in clients + providers)
        # The kernel's part: what cgroup v2 charges the container for its sockets (`sock`).
        kernel = sum(b["r"] + b["w"] + b["f"] for b in socket_buffers(sidecar.proc.pid))
        return proc_status(sidecar.proc.pid)[0] - before, kernel
    finally:
        for end in clients + providers:
            end.transport.abort()
        server.close()


def stalled_sessions(tmp_path, limits: str, n: int, env: dict | None = None) -> tuple[int, int, int]:
    """A sidecar with `limits` and a wss provider; its RSS at rest, then the RSS growth
    and kernel socket memory of `n` sessions at their bound (sessions_at_their_bound)."""
    certs = throwaway_certs(str(tmp_path))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    upstream_port = held_port()
    sidecar = SidecarProcess(str(tmp_path), f'[providers.flood]\nurl = "wss://127.0.0.1:{upstream_port}/"\n'
                             f'ca_file = "{certs.ca}"\n', standard_keys(), limits=limits, env=env).start()
    try:
        rest = proc_status(sidecar.proc.pid)[0]
        rss, kernel = asyncio.run(sessions_at_their_bound(sidecar, upstream_port, context, n))
    finally:
        sidecar.stop()
    return rest, rss, kernel


@pytest.mark.alone
@needs_kubectl
def test_the_sidecar_memory_limit_holds_max_connections_sessions_at_their_bound(tmp_path):
    """Each session's memory is bounded whatever its peers do, and the pod's limit must
    hold that bound times max_connections: an app that stops reading (an end user on a
    slow line, a stall) while its provider streams, or a provider slow to take the app's
    audio, fills each session to it, and an OOM kill ends every session of the pod.
    The idle figures (a few KiB, ~20 KiB with a wss provider leg) are not the bound: at
    the default 1000 sessions, 400-485 KiB each made 420-510 MiB against the 128Mi limit.
    Nor is RSS: with the kernel's own socket buffer sizes, the sockets of each such
    session held 10-11 MiB more (loopback), which cgroup v2 charges to the container;
    the ConfigMap's socket_buffer_bytes bounds them."""
    docs = docs_of(kustomize("k8s/base"))
    (tmp_path / "pod").mkdir()
    conf = load_pod_config(docs, tmp_path / "pod")
    sidecar_spec = find(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    limit = sidecar_spec["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    n = 30
    rest, rss, kernel = stalled_sessions(tmp_path, f"max_connections = {conf.limits.max_connections}\n"
                                                   f"socket_buffer_bytes = {conf.limits.socket_buffer_bytes}", n)
    per_session = (rss + kernel) / n
    need = rest + conf.limits.max_connections * per_session
    print(f"at rest {rest / 2**20:.1f} MiB, per session at its bound {rss / n / 1024:.0f} KiB "
          f"and {kernel / n / 1024:.0f} KiB of socket buffers, "
          f"{conf.limits.max_connections} sessions: {need / 2**20:.0f} MiB, limit {limit}")
    assert need < int(limit[:-2]) << 20


@pytest.mark.alone
def test_a_stalled_session_on_uvloops_tls_transport_reads_no_further_than_its_limit(tmp_path):
    """Built without OpenSSL's headers (or with CONDUIT_NATIVE_TLS=0), the relay's TLS
    legs are uvloop's SSL transport, which goes on reading a paused leg's socket until
    256 KiB of records wait, and keeps a buffer that size: a stalled session held
    1,000-1,050 KiB, against ~260 on the relay's own TLS. The relay sets the transport's
    read limit to 64 KiB (above one record, so a record cut in two is always read
    whole): 680-760 KiB."""
    n = 30
    _, rss, _ = stalled_sessions(tmp_path, "socket_buffer_bytes = 65536", n, env={"CONDUIT_NATIVE_TLS": "0"})
    print(f"per session at its bound {rss / n / 1024:.0f} KiB")
    assert rss / n < 880 * 1024


@needs_kubectl
def test_tls_overlay_is_what_the_injector_makes(tmp_path):
    docs = docs_of(kustomize("k8s/tls"))
    spec = find(docs, "Deployment", "example-app")["spec"]["template"]["spec"]
    sidecar = spec["initContainers"][0]
    assert normalized(sidecar) == normalized(sidecar_container(Settings(image=DEFAULT_IMAGE, tls=True)))
    check_injected({"metadata": {"annotations": {"conduit.dev/status": "injected"}}, "spec": spec},
                   tls=True, image=DEFAULT_IMAGE)
    (app,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["NODE_EXTRA_CA_CERTS"] == "/var/run/conduit/ca.pem"
    assert env["OPENAI_BASE_URL"].startswith("https://127.0.0.1:8443/")
    conf = load_pod_config(docs, tmp_path)    # the [tls] section the variables make is valid
    assert conf.tls.self_signed and conf.tls.listen == "127.0.0.1:8443"
    assert (conf.tls.ca_out, conf.tls.state_dir) == ("/var/run/conduit/ca.pem", "/var/run/conduit-private")


@needs_kubectl
@pytest.mark.parametrize("directory", ["k8s/injector", "k8s/injector/webhook"])
def test_injector_manifests(directory):
    docs = docs_of(kustomize(directory))
    (hook,) = find(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["timeoutSeconds"] == 5
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["objectSelector"] == {"matchLabels": {"conduit.dev/inject": "true"}}
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
    assert set(expr["values"]) == {"kube-system", "conduit-system"}

    ref = hook["clientConfig"]["service"]
    assert (ref["namespace"], ref["path"], ref["port"]) == ("conduit-system", "/mutate", 443)
    service = find(docs, "Service", ref["name"])
    (port,) = service["spec"]["ports"]
    deployment = find(docs, "Deployment", "conduit-injector")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == 8443 and port["port"] == 443
    assert container["args"][0] == "inject-webhook"
    assert "--listen=*:8443" in container["args"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CONDUIT_SIDECAR_IMAGE"] == container["image"] == DEFAULT_IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding",
                                                 "ClusterRoleBinding")]
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for d in docs:
        if d["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert d["metadata"]["namespace"] == "conduit-system"

    tls_volume = named(pod["spec"]["volumes"], "tls")[0]["secret"]["secretName"]
    annotations = find(docs, "MutatingWebhookConfiguration")["metadata"].get("annotations", {})
    if directory == "k8s/injector":
        namespace, name = annotations["cert-manager.io/inject-ca-from"].split("/")
        certificate = find(docs, "Certificate", name)
        assert certificate["metadata"]["namespace"] == namespace
        assert certificate["spec"]["secretName"] == tls_volume
        assert "conduit-injector.conduit-system.svc" in certificate["spec"]["dnsNames"]
        issuer = find(docs, "Issuer", certificate["spec"]["issuerRef"]["name"])
        assert issuer["metadata"]["namespace"] == namespace
        # Signed by a CA of its own, which renewals keep: a self-signed serving
        # certificate is its own CA, and caBundle changed before the pods had the new one.
        ca = next(d for d in docs if d["kind"] == "Certificate"
                  and d["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"])
        assert ca["spec"]["isCA"] is True and ca["spec"]["privateKey"]["rotationPolicy"] == "Never"
        assert "selfSigned" in find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"]
    else:
        assert not annotations and not [d for d in docs if d["apiVersion"].startswith("cert-manager")]


# --- the webhook over HTTPS --------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A throwaway CA and a serving certificate for 127.0.0.1 (cert, key, CA file)."""
    directory = tmp_path_factory.mktemp("webhook-tls")
    ca = CA()
    cert_file, key_file = ca.issue(directory)
    return cert_file, key_file, ca.write(directory / "ca.pem")


class Webhook:
    def __init__(self, port: int, ca_file: str):
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.context = ssl.create_default_context(cafile=ca_file)

    def request(self, path: str, body: bytes | None = None, method: str = "POST",
                headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.context) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def review(self, obj: dict, *, uid: str = "7f0b2c1e-0000-4000-8000-000000000001",
               namespace: str = "voice", kind: str = "Pod", operation: str = "CREATE") -> dict:
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
                              "resource": {"group": "", "version": "v1", "resource": "pods"},
                              "requestKind": {"group": "", "version": "v1", "kind": kind},
                              "namespace": namespace, "operation": operation,
                              "userInfo": {"username": "system:serviceaccount:kube-system:"
                                                       "replicaset-controller"},
                              "object": obj, "oldObject": None, "dryRun": False,
                              "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}
        status, body = self.request("/mutate", json.dumps(review).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == uid
        return answer["response"]


def start_webhook(cert_file: str, key_file: str, ca_file: str, *args: str, env: dict | None = None):
    """`conduit-sidecar inject-webhook` on a free loopback port, once it answers."""
    port = held_port()
    log = tempfile.TemporaryFile()  # not a pipe: one read only at the end would fill and stall it
    proc = subprocess.Popen(CLI + ["inject-webhook", "--tls-cert", cert_file,
                                   "--tls-key", key_file, "--listen", f"127.0.0.1:{port}", *args],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    proc.log = log  # type: ignore[attr-defined]
    hook = Webhook(port, ca_file)
    deadline = time.monotonic() + 15
    while True:
        try:
            if hook.request("/healthz", method="GET") == (200, b"ok\n"):
                return proc, hook
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the webhook did not start: " + webhook_log(proc))
        time.sleep(0.05)


def webhook_log(proc: subprocess.Popen) -> str:
    """The webhook's log, once it has exited."""
    proc.wait(timeout=10)
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read().decode()  # type: ignore[attr-defined]


def stop(proc: subprocess.Popen) -> str:
    """SIGINT: the webhook exits cleanly at once; returns its log."""
    proc.send_signal(signal.SIGINT)
    log = webhook_log(proc)
    assert proc.returncode == 0, log
    assert "Traceback" not in log, log
    return log


@pytest.fixture(scope="module")
def webhook(tls_files):
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE)
    yield hook
    stop(proc)


def test_webhook_answers_for_a_while_after_sigterm(tls_files):
    """The API server goes on sending reviews to a pod being deleted until its
    endpoints catch up, and failurePolicy is Fail: the webhook stopped listening at
    once, and pods created meanwhile were refused."""
    proc, hook = start_webhook(*tls_files, "--shutdown-delay", "3")
    proc.terminate()
    time.sleep(0.5)
    assert hook.request("/healthz", method="GET") == (200, b"ok\n")
    assert proc.wait(10) == 0
    assert '"event":"stopping"' in webhook_log(proc)



@pytest.mark.parametrize("flag, value", [
    ("--shutdown-delay", "nan"),      # SIGTERM raised in call_later: it never stopped
    ("--shutdown-delay", "-5"),
    ("--shutdown-delay", "inf"),
    ("--max-connections", "0"),       # every connection closed at once: no review served
    ("--max-connections", "-1"),
])
def test_webhook_refuses_flags_out_of_range(tmp_path, flag, value):
    """Refused before anything starts (the certificate files are not even read)."""
    r = subprocess.run(CLI + ["inject-webhook", "--tls-cert", str(tmp_path / "none.crt"), "--tls-key",
                              str(tmp_path / "none.key"), flag, value],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr

def test_webhook_reloads_a_renewed_certificate(tmp_path):
    """cert-manager renews the Secret in place; new connections get the new certificate."""
    old_ca, new_ca = CA("old CA"), CA("new CA")
    cert_file, key_file = old_ca.issue(tmp_path)
    proc, old = start_webhook(cert_file, key_file, old_ca.write(tmp_path / "old.pem"))
    try:
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        for src, dst in zip(new_ca.issue(renewed), (cert_file, key_file), strict=True):
            os.replace(src, dst)
        new = Webhook(old.port, new_ca.write(tmp_path / "new.pem"))
        assert new.request("/healthz", method="GET") == (200, b"ok\n")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            old.request("/healthz", method="GET")
    finally:
        output = stop(proc)
    assert "certificate reloaded" in output


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in bytes, thread count) of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def webhook_container() -> tuple[int, dict]:
    """The injector Deployment's memory limit in bytes (a Mi quantity), and its
    environment for the process (glibc's and Python's malloc settings)."""
    with open(ROOT / "k8s/injector/webhook/deployment.yaml") as f:
        (container,) = yaml.safe_load(f)["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith(("MALLOC_", "PYTHONMALLOC"))}
    return int(limit[:-2]) << 20, env


async def slow_body_attack(hook: Webhook, *, connections: int = 80, during=None) -> dict:
    """`connections` clients each announce a MAX_BODY body, send all but its last
    100 bytes in 64 KiB pieces, then trickle a byte a second (a timeout per read
    never fires). `during()` runs in a thread once every body is under way. The
    webhook's RSS and threads are sampled throughout; returns the figures."""
    samples: list[tuple[int, int]] = []
    sent = [0] * connections
    writers = []

    async def attacker(i: int) -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", hook.port, ssl=hook.context)
            writers.append(writer)
            writer.write(b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % MAX_BODY)
            while sent[i] < MAX_BODY - 100:
                piece = min(64 << 10, MAX_BODY - 100 - sent[i])
                writer.write(b" " * piece)
                await writer.drain()
                sent[i] += piece
                await asyncio.sleep(0.02)
            while sent[i] < MAX_BODY - 1:
                writer.write(b" ")
                await writer.drain()
                sent[i] += 1
                await asyncio.sleep(1)
        except (OSError, ssl.SSLError):
            pass        # dropped by the webhook

    async def sample() -> None:
        while True:
            samples.append(proc_status(hook.pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    attack = [asyncio.create_task(attacker(i)) for i in range(connections)]
    await asyncio.sleep(4)         # the bulk of every body is sent (or refused) by now
    result = await asyncio.to_thread(during) if during else None
    await asyncio.sleep(8)
    for task in attack:
        task.cancel()
    for writer in writers:
        writer.transport.abort()
    sampler.cancel()
    return {"max_rss": max(r for r, _ in samples), "max_threads": max(t for _, t in samples),
            "sent": sum(sent), "during": result}


def test_webhook_holds_a_slow_body_attack(tls_files):
    """Review finding 6 (fails on main at 39d1546: 196 MB and 82 threads, a thread per
    connection and a timeout per read). 80 connections trickling 2 MiB bodies: the
    webhook's memory stays under its manifest limit and returns near its baseline, its
    thread count stays flat, and /healthz and a real review are answered meanwhile."""
    limit, env = webhook_container()
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE, env=env)
    hook.pid = proc.pid
    try:
        rss0, threads0 = proc_status(proc.pid)

        def meanwhile():
            health = hook.request("/healthz", method="GET")
            response = hook.review(pod())
            return health, response

        figures = asyncio.run(slow_body_attack(hook, during=meanwhile))
        (health, response) = figures["during"]
        assert health == (200, b"ok\n")
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        assert figures["sent"] > 40 * MAX_BODY // 2       # the attack did send its bodies
        assert figures["max_rss"] < limit, figures
        assert figures["max_threads"] == threads0, figures
        deadline = time.monotonic() + 15
        while (rss := proc_status(proc.pid)[0]) > rss0 + (16 << 20):
            assert time.monotonic() < deadline, f"RSS stayed at {rss >> 20} MiB (baseline {rss0 >> 20} MiB)"
            time.sleep(0.5)
        assert hook.request("/healthz", method="GET") == (200, b"ok\n")
    finally:
        output = stop(proc)
    print(f"baseline {rss0 >> 20} MiB, {threads0} threads; under attack max {figures['max_rss'] >> 20} MiB, "
          f"{figures['max_threads']} threads; after {rss >> 20} MiB; limit {limit >> 20} MiB")
    assert "shed" in output


def test_bodies_past_the_budget_drop_the_connection_holding_the_most():
    """_Bodies: the bodies in progress together stay within the budget; the byte that
    passes it drops the connection holding the most (perhaps the one adding), and its
    bytes no longer count."""
    from conduit_sidecar.k8s.webhook import _Bodies

    class Connection:
        dropped = False

        def drop(self):
            self.dropped = True

    bodies = _Bodies(100)
    big, small = Connection(), Connection()
    bodies.add(big, 60)
    bodies.add(small, 40)                          # 100: at the budget, none dropped
    assert not big.dropped and not small.dropped
    bodies.add(small, 1)                           # 101: the largest goes
    assert big.dropped and not small.dropped and bodies.total == 41


def test_webhook_answer_to_one_review_fits_its_memory_limit(tls_files):
    """In TLS mode each app container gets two patch operations (~230 bytes of JSON,
    then base64) however small it is: one review of 2 MiB of empty containers (`{}`, 4
    bytes each; the API server would never send it, but any pod that reaches the
    Service can) made the webhook build ~1.4 million operations, seconds of CPU and
    far more than its 128Mi limit: one request OOM-killed it. Refused now."""
    limit, env = webhook_container()
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE, env=env)
    try:
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"annotations": {"conduit.dev/tls": "true"}},
               "spec": {"containers": [{}] * ((MAX_BODY - 1000) // 4)}}  # "{}, "
        response = hook.review(obj)
        assert response["allowed"] is False and "containers" in response["status"]["message"]
        with open(f"/proc/{proc.pid}/status") as f:
            peak = int(dict(line.split(":", 1) for line in f)["VmHWM"].split()[0]) * 1024
        assert peak < limit, f"peak RSS {peak >> 20} MiB, limit {limit >> 20} MiB"
        assert hook.review(pod(annotations={"conduit.dev/tls": "true"}))["allowed"] is True
    finally:
        stop(proc)


def test_webhook_gives_back_the_memory_of_large_refused_reviews(tls_files):
    """A burst of reviews near MAX_BODY whose pod is refused (120,000 labels and a bad
    annotation: many small objects once decoded). The webhook kept about half of what
    the burst took for good (+10 to +16 MiB of its 128Mi; pymalloc's arenas pinned by
    a few objects that outlived each request, glibc's heap not trimmed). With the
    manifest's environment it returns to within a quarter of that growth."""
    limit, env = webhook_container()
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE, env=env)
    labels = {f"l{i}": "v" for i in range(120_000)}
    refused = pod(annotations={"conduit.dev/tls": "maybe"})
    refused["metadata"]["labels"].update(labels)
    try:
        assert hook.review(pod())["allowed"] is True
        before = proc_status(proc.pid)[0]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(hook.review, [refused] * 12))
        assert all(answer["allowed"] is False for answer in answers)
        assert hook.review(pod())["allowed"] is True
        after = proc_status(proc.pid)[0]
        with open(f"/proc/{proc.pid}/status") as f:
            peak = int(dict(line.split(":", 1) for line in f)["VmHWM"].split()[0]) * 1024
    finally:
        stop(proc)
    grown = peak - before
    assert grown > 8 << 20, f"the burst took only {grown >> 20} MiB"      # it did take memory
    assert after - before < grown / 4, (
        f"RSS {before >> 20} MiB, {peak >> 20} at the peak, {after >> 20} after the burst")


def test_webhook_spends_no_tls_handshake_past_max_connections(tls_files):
    """Connections count from accept, not from the end of their TLS handshake: with
    `--max-connections 2`, two connections that never send a ClientHello take both
    places, the third is closed at once (no handshake state is made for it), and once
    one of the two goes a review is answered again. Unbounded, a peer in the cluster
    could hold any number of pending handshakes for REQUEST_DEADLINE each."""
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE, "--max-connections", "2")
    held = [socket.create_connection(("127.0.0.1", hook.port)) for _ in range(2)]
    try:
        time.sleep(0.3)
        for _ in range(3):  # one refused, then two more within its second
            third = socket.create_connection(("127.0.0.1", hook.port))
            third.settimeout(5)
            try:
                closed = third.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                closed = False
            third.close()
            assert closed, "a third connection waited for its TLS handshake"
        held.pop().close()
        # Its place is free once the webhook has read its end, which a loaded machine
        # may delay: until then a review's connection is refused (reset), and counted.
        again, deadline = 0, time.monotonic() + 10
        while True:
            try:
                response = hook.review(pod())
                break
            except urllib.error.URLError:
                again += 1
                assert time.monotonic() < deadline, "no place was given back"
                time.sleep(0.05)
        assert response["allowed"] is True
    finally:
        for s in held:
            s.close()
        output = stop(proc)
    # Each refusal is told, the last ones by the end of their second (or the stop): they
    # were written only when a later refusal came, so the last flood's count never was.
    shed = [json.loads(line) for line in output.splitlines() if '"event":"shed"' in line]
    assert sum(line["refused"] for line in shed) == 3 + again, shed


def test_webhook_reads_no_further_a_client_that_never_reads_what_its_records_make_it_send(tls_files):
    """TLS records that OpenSSL answers on its own (key update requests; in TLS 1.2
    renegotiation ClientHellos), sent by a client that reads none of the answers: every
    answer waited in the webhook's write buffer until REQUEST_DEADLINE (one connection:
    +72 MiB of the injector's 128Mi with TLS 1.2 ClientHellos). Reading stops while the
    answers back up."""
    from test_tls import key_updates_unread
    proc, hook = start_webhook(*tls_files)
    try:
        sent, grown = key_updates_unread(hook.port, proc.pid)
        assert grown < 4 << 10, f"RSS +{grown} KiB for {sent} bytes of key update requests"
        assert hook.request("/healthz", method="GET") == (200, b"ok\n")
    finally:
        stop(proc)


def keep_alive_review(conn: http.client.HTTPSConnection, uid: str) -> dict:
    """One review on `conn`, which must stay open (no reconnection)."""
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                          "namespace": "voice", "operation": "CREATE", "object": pod()}}
    conn.request("POST", "/mutate", json.dumps(review), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and not r.will_close
    return json.loads(r.read())["response"]


def test_webhook_takes_the_end_of_a_kept_alive_connection_quietly(tls_files):
    """The API server ends an idle kept-alive connection by closing its socket (no TLS
    close_notify): the webhook then wrote its own close_notify to the closed socket and
    logged a warning with uvloop's RuntimeError traceback, for every such connection."""
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE)
    conn = http.client.HTTPSConnection("127.0.0.1", hook.port, context=hook.context, timeout=10)
    try:
        for uid in ("first", "second"):
            assert keep_alive_review(conn, uid)["uid"] == uid
    finally:
        conn.close()
    assert hook.request("/healthz", method="GET") == (200, b"ok\n")  # after the close was seen
    output = stop(proc)                                   # no "Traceback" in the log
    assert '"connection error"' not in output, output


def test_webhook_keeps_an_idle_connection_longer_than_the_api_server(webhook):
    """The API server keeps an idle connection to the webhook for 90 s (Go's
    http.Transport IdleConnTimeout) and sends a review on it whenever; the webhook
    dropped it after 10 s idle, so a review sent just then failed, and with
    failurePolicy Fail the pod was refused. Idle past REQUEST_DEADLINE, the same
    connection still answers."""
    conn = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=webhook.context, timeout=10)
    try:
        assert keep_alive_review(conn, "first")["allowed"] is True
        sock = conn.sock
        time.sleep(REQUEST_DEADLINE + 1.5)
        assert keep_alive_review(conn, "second")["uid"] == "second"
        assert conn.sock is sock                                   # not a new connection
    finally:
        conn.close()


def test_webhook_gives_an_idle_connections_place_to_a_new_one(tls_files):
    """Kept-alive connections may now idle for minutes: at --max-connections, the
    oldest one idle between requests makes room for a new one, which is answered;
    connections in the middle of a request (or of their TLS handshake) are never
    taken (test_webhook_spends_no_tls_handshake_past_max_connections)."""
    proc, hook = start_webhook(*tls_files, "--sidecar-image", SIDECAR_IMAGE, "--max-connections", "2")
    idle = [http.client.HTTPSConnection("127.0.0.1", hook.port, context=hook.context, timeout=10)
            for _ in range(2)]
    try:
        for n, conn in enumerate(idle):
            assert keep_alive_review(conn, f"idle-{n}")["allowed"] is True
        assert hook.review(pod())["allowed"] is True               # a third connection
        idle[0].sock.settimeout(5)
        assert idle[0].sock.recv(1) == b""                         # the oldest idle one went
        assert keep_alive_review(idle[1], "still-open")["uid"] == "still-open"
    finally:
        for conn in idle:
            conn.close()
        stop(proc)


def apply_patch(pod: dict, patch: list[dict], tmp_path: pathlib.Path) -> dict:
    """Apply with the jsonpatch package and with kubectl; both must agree."""
    patched = jsonpatch.apply_patch(pod, patch)
    if KUBECTL:
        pod_file = tmp_path / "pod.json"
        pod_file.write_text(json.dumps(pod))
        run = subprocess.run([KUBECTL, "patch", "--local", "--type=json", "-f", str(pod_file),
                              "-p", json.dumps(patch), "-o", "yaml"],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert yaml.safe_load(run.stdout) == patched
    return patched


def pod(name="voice-agent", *, annotations=None, labels=None, init=None, volumes=None, containers=None):
    p = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": "voice",
                      "labels": {"app": "voice-agent", "conduit.dev/inject": "true", **(labels or {})}},
         "spec": {"containers": containers or [{"name": "app", "image": "node:20-slim",
                                                 "command": ["node", "server.js"],
                                                 "ports": [{"containerPort": 3000, "name": "http"}]}]}}
    if annotations is not None:
        p["metadata"]["annotations"] = annotations
    if init is not None:
        p["spec"]["initContainers"] = init
    if volumes is not None:
        p["spec"]["volumes"] = volumes
    return p


BUSY_POD = pod(
    annotations={"prometheus.io/scrape": "true", "kubectl.kubernetes.io/default-container": "app"},
    init=[{"name": "migrate", "image": "busybox:1.36", "command": ["true"]}],
    volumes=[{"name": "data", "emptyDir": {}}, {"name": "conf", "configMap": {"name": "app-conf"}}],
    containers=[{"name": "app", "image": "node:20-slim",
                 "env": [{"name": "PORT", "value": "3000"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "worker", "image": "python:3.12-slim",
                 "volumeMounts": [{"name": "conf", "mountPath": "/conf", "readOnly": True}]}])


def deployment_pod() -> dict:
    """The pod the ReplicaSet controller creates from a Deployment's template."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "voice-agent-5d4f8c7b9-", "namespace": "voice",
                         "labels": {"app": "voice-agent", "conduit.dev/inject": "true",
                                    "pod-template-hash": "5d4f8c7b9"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "voice-agent-5d4f8c7b9",
                                              "uid": "0b5f1e2a-1111-4222-8333-444455556666",
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": "app", "image": "node:20-slim", "resources": {},
                                     "terminationMessagePath": "/dev/termination-log",
                                     "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
                     "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                     "dnsPolicy": "ClusterFirst", "securityContext": {},
                     "schedulerName": "default-scheduler"}}


@pytest.mark.parametrize("name, obj, tls", [
    ("bare pod: no annotations, initContainers or volumes", pod(), False),
    ("pod without metadata", {"apiVersion": "v1", "kind": "Pod",
                              "spec": {"containers": [{"name": "app", "image": "node:20-slim"}]}}, False),
    ("pod with initContainers, volumes, annotations", BUSY_POD, False),
    ("pod from a Deployment's template", deployment_pod(), False),
    ("tls, bare pod", pod(annotations={"conduit.dev/tls": "true"}), True),
    ("tls, busy pod", {**BUSY_POD, "metadata": {**BUSY_POD["metadata"], "annotations": {
        **BUSY_POD["metadata"]["annotations"], "conduit.dev/tls": "true"}}}, True),
])
def test_webhook_injects(webhook, tmp_path, name, obj, tls):
    response = webhook.review(obj)
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert all(op["op"] == "add" for op in patch)
    patched = apply_patch(obj, patch, tmp_path)
    validate(patched)
    check_injected(patched, tls=tls)
    # Everything the pod had is still there, in the same order.
    before = [c["name"] for c in obj["spec"]["containers"]]
    assert [c["name"] for c in patched["spec"]["containers"]] == before
    before_init = [c["name"] for c in obj["spec"].get("initContainers", [])]
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["conduit-sidecar"] + before_init
    for v in obj["spec"].get("volumes", []):
        assert named(patched["spec"]["volumes"], v["name"]) == [v]
    for key, value in (obj.get("metadata", {}).get("annotations") or {}).items():
        assert patched["metadata"]["annotations"][key] == value
    # Reinvocation, or a second webhook pass: nothing more to do.
    again = webhook.review(patched, uid="7f0b2c1e-0000-4000-8000-000000000002")
    assert again["allowed"] is True and "patch" not in again


def test_webhook_tls_keeps_the_apps_own_ca_setting(webhook, tmp_path):
    containers = [{"name": "web", "image": "node:20-slim",
                   "env": [{"name": "NODE_EXTRA_CA_CERTS", "value": "/etc/ssl/corp.pem"}]},
                  {"name": "agent", "image": "node:20-slim"}]
    obj = pod(annotations={"conduit.dev/tls": "true"}, containers=containers)
    response = webhook.review(obj)
    patched = apply_patch(obj, json.loads(base64.b64decode(response["patch"])), tmp_path)
    validate(patched)
    check_injected(patched, tls=True)
    web, agent = patched["spec"]["containers"]
    assert web["env"] == [{"name": "NODE_EXTRA_CA_CERTS", "value": "/etc/ssl/corp.pem"}]
    assert agent["env"] == [{"name": "NODE_EXTRA_CA_CERTS", "value": "/var/run/conduit/ca.pem"}]


ENV_FROM_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: voice}
spec:
  selector: {matchLabels: {app: voice}}
  template:
    metadata:
      labels: {app: voice}
      annotations: {conduit.dev/tls: "true"}
    spec:
      containers:
        - name: web               # its ConfigMap may set NODE_EXTRA_CA_CERTS
          image: node:20-slim
          envFrom: [{configMapRef: {name: web-config}}]
        - name: worker            # every name it takes starts with APP_
          image: node:20-slim
          envFrom: [{prefix: APP_, secretRef: {name: worker-secrets}}]
        - name: api               # keeps the envFrom value: env names it
          image: node:20-slim
          envFrom: [{configMapRef: {name: api-config}}]
          env: [{name: NODE_EXTRA_CA_CERTS, value: $(NODE_EXTRA_CA_CERTS)}]
"""


def test_tls_injection_says_which_containers_envfrom_ca_setting_it_overrides(webhook, tmp_path):
    """In TLS mode the injected `env` entry NODE_EXTRA_CA_CERTS wins over one an app
    container takes from `envFrom` (a ConfigMap the injector cannot read): the app's
    own CA file (a corporate proxy's) was replaced without a word. The entry stays
    (without it Node trusts no sidecar), but the pod's `conduit.dev/warning`
    annotation and the webhook's admission warning name the containers it may
    override and how to keep their value; an envFrom whose prefix cannot make the
    name, or a container whose `env` sets it, is not named (nor changed)."""
    source = tmp_path / "deployment.yaml"
    source.write_text(ENV_FROM_DEPLOYMENT)
    run = inject_cli("-f", str(source))
    assert run.returncode == 0, run.stderr
    template = yaml.safe_load(run.stdout)["spec"]["template"]
    web, worker, api = template["spec"]["containers"]
    for container in (web, worker):
        assert named(container["env"], "NODE_EXTRA_CA_CERTS") == [
            {"name": "NODE_EXTRA_CA_CERTS", "value": "/var/run/conduit/ca.pem"}]
    assert api["env"] == [{"name": "NODE_EXTRA_CA_CERTS", "value": "$(NODE_EXTRA_CA_CERTS)"}]
    warning = template["metadata"]["annotations"]["conduit.dev/warning"]
    assert warning.startswith("container web takes variables from envFrom: "), warning
    assert "worker" not in warning and "api" not in warning
    assert "$(NODE_EXTRA_CA_CERTS)" in warning
    obj = {"apiVersion": "v1", "kind": "Pod", **yaml.safe_load(ENV_FROM_DEPLOYMENT)["spec"]["template"]}
    response = webhook.review(obj)
    assert response["allowed"] is True and response["warnings"] == [warning]
    patched = apply_patch(obj, json.loads(base64.b64decode(response["patch"])), tmp_path)
    assert patched["metadata"]["annotations"]["conduit.dev/warning"] == warning
    # A pod with nothing overridden gets neither.
    plain = webhook.review(pod(annotations={"conduit.dev/tls": "true"}))
    assert "warnings" not in plain


def test_webhook_annotations_configure_the_sidecar(webhook, tmp_path):
    obj = pod(annotations={
        "conduit.dev/native-sidecar": "false", "conduit.dev/image": "registry.example.com/cs:1.2.3",
        "conduit.dev/listen-port": "18080", "conduit.dev/admin-port": "19464",
        "conduit.dev/cpu-request": "100m", "conduit.dev/cpu-limit": "1", "conduit.dev/memory-request": "96Mi",
        "conduit.dev/memory-limit": "256Mi", "conduit.dev/keys-secret": "team-a-keys",
        "conduit.dev/provider-secret": "openai-prod", "conduit.dev/config-map": "conduit-config-v2"})
    response = webhook.review(obj)
    patched = apply_patch(obj, json.loads(base64.b64decode(response["patch"])), tmp_path)
    validate(patched)
    sidecar = check_injected(patched, native=False, image="registry.example.com/cs:1.2.3")
    assert patched["spec"]["containers"][-1] is sidecar and "initContainers" not in patched["spec"]
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "96Mi"},
                                    "limits": {"cpu": "1", "memory": "256Mi"}}
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"conduit": 18080,
                                                                          "conduit-metrics": 19464}
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["CONDUIT_LISTEN"] == "127.0.0.1:18080" and env["CONDUIT_ADMIN_LISTEN"] == "*:19464"
    volumes = {v["name"]: v for v in patched["spec"]["volumes"]}
    assert volumes["conduit-keys"]["secret"]["secretName"] == "team-a-keys"
    assert volumes["conduit-providers"]["secret"]["secretName"] == "openai-prod"
    assert volumes["conduit-config"]["configMap"]["name"] == "conduit-config-v2"


@pytest.mark.parametrize("annotations, message", [
    ({"conduit.dev/listen-port": "http"}, "'conduit.dev/listen-port': must be a port number"),
    ({"conduit.dev/admin-port": "70000"}, "'conduit.dev/admin-port': must be a port number"),
    ({"conduit.dev/memory-limit": "lots"}, "'conduit.dev/memory-limit': must be a Kubernetes quantity"),
    ({"conduit.dev/keys-secret": "Team_A"}, "'conduit.dev/keys-secret': must be a Kubernetes object name"),
    ({"conduit.dev/image": "evil image\n"}, "'conduit.dev/image': must be an image reference"),
    # A trailing newline: the API server would refuse the pod with its own message.
    ({"conduit.dev/image": "registry.example.com/cs:1.2.3\n"}, "'conduit.dev/image': must be an image"),
    ({"conduit.dev/memory-limit": "256Mi\n"}, "'conduit.dev/memory-limit': must be a Kubernetes quantity"),
    ({"conduit.dev/keys-secret": "team-a-keys\n"}, "'conduit.dev/keys-secret': must be a Kubernetes object"),
    ({"conduit.dev/tls": "yes"}, "'conduit.dev/tls': must be \"true\" or \"false\""),
    ({"conduit.dev/listen-port": "9464"}, "must differ"),
    ({"conduit.dev/memory-limt": "1Gi"}, "unknown annotation 'conduit.dev/memory-limt'"),
])
def test_webhook_refuses_bad_annotations(webhook, annotations, message):
    response = webhook.review(pod(annotations=annotations))
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    assert message in response["status"]["message"]


def test_webhook_refusal_quotes_a_huge_value_shortened(tls_files):
    """Annotations (256 KiB) and names (253 characters) are limited by the API server's
    validation, which runs after admission: a 1.5 MB bad value was quoted whole in the
    answer and in a log line of the webhook's, at every retry of the ReplicaSet
    controller, and a 1.5 MB name in the log line."""
    proc, hook = start_webhook(*tls_files)
    try:
        response = hook.review(pod(annotations={"conduit.dev/memory-limit": "x" * 1_500_000}))
        assert response["allowed"] is False
        message = response["status"]["message"]
        assert "'conduit.dev/memory-limit': must be a Kubernetes quantity" in message
        assert len(message) < 2000
        assert hook.review(pod(name="p" * 1_500_000))["allowed"] is True  # its name is logged
    finally:
        log = stop(proc)
    assert max(map(len, log.splitlines())) < 3000


_LONG = "a" * (1 << 20)


@pytest.mark.parametrize("name, annotations, containers, message", [
    ("p", {"conduit.dev/" + _LONG: "1"}, None, "unknown annotation 'conduit.dev/aaa"),
    ("p", {"conduit.dev/tls": _LONG}, None, "'conduit.dev/tls': must be \"true\" or \"false\", got 'aaa"),
    ("p", {"conduit.dev/tls": [_LONG]}, None, "'conduit.dev/tls': value must be a string, got ['aaa"),
    ("p", None, [{"name": _LONG, "image": "app", "ports": [{"containerPort": 8080}]}], "container 'aaa"),
    ("p", None, [{"name": _LONG, "image": "app", "env": 5}], "container 'aaa"),
], ids=["annotation name", "annotation value", "annotation not a string", "container name", "malformed"])
def test_webhook_quotes_a_pods_own_values_briefly(webhook, name, annotations, containers, message):
    """A refusal quoted the pod's annotation or container name whole, so a review of
    2 MiB was answered with 2 MiB: 120 clients that sent two such reviews each (one
    every 80 ms) and read none of the answers took the webhook from 30 to 420 MB for
    the 10 s they are given, far past its 128Mi. Each value is quoted in 64 characters."""
    response = webhook.review(pod(name, annotations=annotations, containers=containers))
    assert response["allowed"] is False and message in response["status"]["message"]
    assert len(response["status"]["message"]) < 1024


def test_webhook_refuses_conflicting_pods(webhook):
    clash = pod(volumes=[{"name": "conduit-keys", "emptyDir": {}}])
    response = webhook.review(clash)
    assert response["allowed"] is False and "conduit-keys" in response["status"]["message"]


@pytest.mark.parametrize("containers, annotations, message", [
    ([{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}], None,
     "container 'app' declares port 8080, which the conduit sidecar listens on: set conduit.dev/listen-port"),
    ([{"name": "app", "image": "app", "ports": [{"containerPort": 9464}]}], None, "conduit.dev/admin-port"),
    ([{"name": "app", "image": "app", "ports": [{"containerPort": 8443}]}], {"conduit.dev/tls": "true"},
     "conduit.dev/tls-port"),
])
def test_webhook_refuses_a_pod_whose_app_declares_a_sidecar_port(webhook, containers, annotations, message):
    """The app's own 8080 (the commonest app port) or 9464: once the sidecar holds it,
    the app's bind fails and it crash-loops. Refused with the annotation that moves ours."""
    response = webhook.review(pod(containers=containers, annotations=annotations))
    assert response["allowed"] is False and message in response["status"]["message"]
    moved = webhook.review(pod(containers=containers, annotations={
        **(annotations or {}), "conduit.dev/listen-port": "18080", "conduit.dev/admin-port": "19464",
        "conduit.dev/tls-port": "18443"}))
    assert moved["allowed"] is True and moved["patch"]
    udp = [{**containers[0], "ports": [{**containers[0]["ports"][0], "protocol": "UDP"}]}]
    assert webhook.review(pod(containers=udp, annotations=annotations))["allowed"] is True  # not ours


@pytest.mark.parametrize("probe, annotations, message", [
    ({"readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}, None, "conduit.dev/listen-port"),
    ({"livenessProbe": {"tcpSocket": {"port": 9464}}}, None, "conduit.dev/admin-port"),
    ({"startupProbe": {"grpc": {"port": 8443}}}, {"conduit.dev/tls": "true"}, "conduit.dev/tls-port"),
])
def test_webhook_refuses_a_pod_whose_app_probes_a_sidecar_port(webhook, probe, annotations, message):
    """Declaring a port is optional: an app that listens on 8080 often says so only in
    its probes. Injected, its bind failed (the sidecar holds the port) and it crash-looped."""
    containers = [{"name": "app", "image": "app", **probe}]
    response = webhook.review(pod(containers=containers, annotations=annotations))
    assert response["allowed"] is False
    assert "container 'app' probes port" in response["status"]["message"]
    assert message in response["status"]["message"]
    named = [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 3000}],
              "readinessProbe": {"httpGet": {"path": "/", "port": "http"}}}]
    assert webhook.review(pod(containers=named, annotations=annotations))["allowed"] is True


def test_webhook_refuses_a_host_network_pod(webhook):
    """On hostNetwork the pod's loopback is the node's: any process there could use
    the sidecar (and its keys) and drain it."""
    host = pod()
    host["spec"]["hostNetwork"] = True
    response = webhook.review(host)
    assert response["allowed"] is False and "hostNetwork" in response["status"]["message"]


def test_webhook_refuses_a_windows_pod(webhook):
    """The sidecar is a Linux image, and the API server forbids on a Windows pod the
    securityContext fields it carries (capabilities, seccompProfile, runAsUser...):
    injected, the pod was refused by the API server for fields its author never wrote."""
    windows = pod()
    windows["spec"]["os"] = {"name": "windows"}
    response = webhook.review(windows)
    assert response["allowed"] is False and "spec.os.name" in response["status"]["message"]
    linux = pod()
    linux["spec"]["os"] = {"name": "linux"}
    assert webhook.review(linux)["allowed"] is True


@pytest.mark.parametrize("obj, message", [
    (None, "not a pod"),
    ("a pod", "not a pod"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}, "no spec"),
    ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}, "spec.containers"),
    ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": ["app"]}}, "spec.containers"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"annotations": ["x"]},
      "spec": {"containers": [{"name": "a"}]}}, "metadata.annotations"),
    ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "a"}], "volumes": {"x": 1}}},
     "spec.volumes"),
    # Types the API server would never send, but another client may: a refusal that
    # says what is wrong, not "internal error" and a traceback in the log.
    ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "a", "ports": 8080}]}},
     "container 'a': ports is not a list of objects"),
    ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "a"}],
                                                  "initContainers": [{"name": "i", "ports": 8080}]}},
     "container 'i': ports is not a list of objects"),
    ({"apiVersion": "v1", "kind": "Pod",
      "spec": {"containers": [{"name": "a", "ports": [{"containerPort": [8080]}]}]}}, None),
    ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "a"}], "volumes": [{"name": ["v"]}]}},
     None),
])
def test_webhook_refuses_malformed_pods(webhook, obj, message):
    response = webhook.review(obj)
    if message is None:  # left to the API server's validation
        assert response["allowed"] is True
    else:
        assert response["allowed"] is False and message in response["status"]["message"]


def test_webhook_answers_a_pod_with_a_malformed_generate_name(webhook):
    """The pod's name for the log line was built outside the try that turns a bug into
    a refusal: a non-string generateName dropped the connection with no answer."""
    obj = pod()
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = ["voice-agent-"]
    assert webhook.review(obj)["allowed"] is True


def test_webhook_malformed_requests(webhook):
    # Not JSON, or no uid to answer to: HTTP 400.
    assert webhook.request("/mutate", b"{not json")[0] == 400
    assert webhook.request("/mutate", b"[]")[0] == 400
    no_uid = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
    assert webhook.request("/mutate", json.dumps(no_uid).encode())[0] == 400
    assert webhook.request("/mutate", b"[" * 100_000 + b"]" * 100_000)[0] == 400   # nesting bomb
    # Too large (refused on the header, before any body is read), the wrong method or path.
    conn = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=webhook.context, timeout=10)
    conn.putrequest("POST", "/mutate")
    conn.putheader("Content-Length", str(MAX_BODY + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert webhook.request("/mutate", method="GET")[0] == 404
    assert webhook.request("/other", b"{}")[0] == 404
    assert webhook.request("/healthz", method="HEAD") == (200, b"")
    # What h11 refuses, answered with its status (a head past the 16 KiB limit, sent no
    # further: the webhook answers and closes with the rest unread, and a client still
    # writing then gets a reset, before it reads the answer).
    for request, status in ((b"GARBAGE\r\n\r\n", 400),
                            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000, 431),
                            (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Content-Length: 6\r\n\r\nhello", 400),
                            (b"POST /mutate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\n{}\r\n0\r\n\r\n", 411)):
        with socket.create_connection(("127.0.0.1", webhook.port)) as raw, \
                webhook.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.settimeout(10)
            tls.sendall(request)
            assert tls.recv(100).startswith(b"HTTP/1.1 %d " % status), request[:40]
    # A review of another version or kind: answered, refused.
    status, body = webhook.request("/mutate", json.dumps({
        "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": pod()}}).encode())
    assert status == 200 and json.loads(body)["response"] == {
        "uid": "u1", "allowed": False,
        "status": {"code": 400, "reason": "BadRequest",
                   "message": "expected apiVersion admission.k8s.io/v1, kind AdmissionReview"}}
    # Not a pod CREATE (the rules would not send it): allowed untouched.
    for kind, operation in (("Deployment", "CREATE"), ("Pod", "UPDATE")):
        response = webhook.review(pod(), kind=kind, operation=operation)
        assert response == {"uid": response["uid"], "allowed": True}
    # A TLS handshake that never comes does not stop the others.
    with socket.create_connection(("127.0.0.1", webhook.port)):
        assert webhook.request("/healthz", method="GET") == (200, b"ok\n")
    assert webhook.request("/healthz", method="GET") == (200, b"ok\n")


# --- inject -f ------------------------------------------------------------------

WORKLOADS = """\
apiVersion: v1
kind: Pod
metadata: {name: voice-pod}
spec:
  containers: [{name: app, image: node:20-slim}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: voice-deploy}
spec:
  selector: {matchLabels: {app: voice}}
  template:
    metadata:
      labels: {app: voice}
      annotations: {conduit.dev/tls: "true"}
    spec:
      initContainers: [{name: wait, image: busybox:1.36, command: ["true"]}]
      containers: [{name: app, image: node:20-slim}]
      volumes: [{name: scratch, emptyDir: {}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: voice-sts}
spec:
  serviceName: voice
  selector: {matchLabels: {app: voice-sts}}
  template:
    metadata: {labels: {app: voice-sts}}
    spec:
      containers: [{name: app, image: node:20-slim}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: voice-ds}
spec:
  selector: {matchLabels: {app: voice-ds}}
  template:
    metadata: {labels: {app: voice-ds}}
    spec:
      containers: [{name: app, image: node:20-slim}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: voice-job}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: app, image: python:3.12-slim, command: [python, job.py]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: voice-cron}
spec:
  schedule: "*/5 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: app, image: python:3.12-slim}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: opted-out}
spec:
  selector: {matchLabels: {app: plain}}
  template:
    metadata: {labels: {app: plain, conduit.dev/inject: "false"}}
    spec:
      containers: [{name: app, image: node:20-slim}]
---
apiVersion: v1
kind: Service
metadata: {name: voice}
spec:
  selector: {app: voice}
  ports: [{port: 80, targetPort: 3000}]
"""


def inject_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["inject", *args], input=stdin, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "CONDUIT_SIDECAR_IMAGE": SIDECAR_IMAGE})


def test_a_pod_with_a_container_of_the_sidecars_name_is_injected_already():
    """Injected before without the status annotation (it was removed, or the sidecar
    added by hand): a container named as ours means no second one, whose name the API
    server would refuse as a duplicate."""
    from conduit_sidecar.k8s.inject import CONTAINER_NAME, json_patch_for_pod

    for where in ("containers", "initContainers"):
        pod = {"metadata": {"name": "app"},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
        pod["spec"].setdefault(where, []).append({"name": CONTAINER_NAME, "image": DEFAULT_IMAGE})
        assert json_patch_for_pod(pod) == [], where


def test_a_tls_pod_whose_app_mounts_the_ca_directory_is_refused():
    """With conduit.dev/tls the sidecar's CA is mounted into each app container at
    CA_DIR: an app container that mounts something there already is refused, not
    given a second mount at one path (which the API server refuses, naming neither)."""
    from conduit_sidecar.k8s.inject import CA_DIR, InjectError, json_patch_for_pod

    pod = {"metadata": {"name": "app", "annotations": {"conduit.dev/tls": "true"}},
           "spec": {"containers": [{"name": "app", "image": "app:1",
                                    "volumeMounts": [{"name": "own", "mountPath": CA_DIR}]}],
                    "volumes": [{"name": "own", "emptyDir": {}}]}}
    with pytest.raises(InjectError, match=f"container 'app' already mounts {CA_DIR}"):
        json_patch_for_pod(pod)


def test_inject_file_every_workload_kind(tmp_path):
    source = tmp_path / "workloads.yaml"
    source.write_text(WORKLOADS)
    run = inject_cli("-f", str(source))
    assert run.returncode == 0, run.stderr
    before, after = docs_of(WORKLOADS), docs_of(run.stdout)
    assert [(d["kind"], d["metadata"]["name"]) for d in after] == \
           [(d["kind"], d["metadata"]["name"]) for d in before]
    for original, obj in zip(before, after, strict=True):
        validate(obj)
        name = obj["metadata"]["name"]
        if obj["kind"] == "Service" or name == "opted-out":
            assert obj == original
            continue
        check_injected(pod_template(obj), tls=name == "voice-deploy")
        # Only the pod template changed.
        rest, rest_before = copy.deepcopy(obj), copy.deepcopy(original)
        for o in (rest, rest_before):
            pod_template(o).clear()
        assert rest == rest_before
    # Idempotent: injecting the output again changes nothing.
    again = inject_cli("-f", "-", stdin=run.stdout)
    assert again.returncode == 0 and docs_of(again.stdout) == after


@pytest.mark.parametrize("text", [
    'kind: Secret\nstringData:\n  openai: "sk-proj-SECRETsecret0123\n---\nkind: Pod\n',  # unclosed quote
    "kind: Secret\nstringData:\n  openai: sk-proj-SECRETsecret0123: x\n",                # a stray colon
    "kind: Pod\nspec:\n  containers:\n  - name: app\n    env:\n"
    "    - {name: KEY, value: sk-proj-SECRETsecret0123\n    - name: X\n",              # an unclosed {
    "kind: Secret\nstringData:\n  openai: *sk-proj-SECRETsecret0123\n",                  # read as an alias
])
def test_inject_file_names_a_yaml_error_by_line_never_quoting_it(tmp_path, text):
    """PyYAML's error quoted the lines around the problem: a manifest with a Secret (or
    an env value) next to a syntax error printed the secret to the terminal or CI log
    that runs `inject -f` (kubectl's own error names the line only)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    run = inject_cli("-f", str(bad))
    assert run.returncode == 1 and "not valid YAML" in run.stderr and "line " in run.stderr, run.stderr
    assert "sk-proj" not in run.stderr, run.stderr


def test_inject_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    """A manifest that is not UTF-8 raised UnicodeDecodeError past the handler."""
    bad = tmp_path / "pod.yaml"
    bad.write_bytes(b"kind: Pod\n\xff\n")
    run = inject_cli("-f", str(bad))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr == f"conduit-sidecar: {bad}: not UTF-8 text\n"


def test_inject_file_json_and_errors(tmp_path):
    source = tmp_path / "pod.json"
    source.write_text(json.dumps(pod(annotations={"conduit.dev/native-sidecar": "false"})))
    run = inject_cli("-f", str(source), "-o", "json")
    assert run.returncode == 0, run.stderr
    obj = json.loads(run.stdout)
    validate(obj)
    check_injected(obj, native=False)
    # No object at all (a file of comments): an empty List, as kubectl prints one.
    source.write_text("# nothing yet\n---\n")
    run = inject_cli("-f", str(source), "-o", "json")
    assert run.returncode == 0 and json.loads(run.stdout) == {"apiVersion": "v1", "kind": "List", "items": []}

    bad = tmp_path / "bad.yaml"
    bad.write_text(WORKLOADS.replace('conduit.dev/tls: "true"', 'conduit.dev/tls: "maybe"'))
    run = inject_cli("-f", str(bad))
    assert run.returncode == 1 and run.stdout == ""
    assert "Deployment/voice-deploy: annotation 'conduit.dev/tls'" in run.stderr
    for content, message in (("a: [1", "not valid YAML"), ("- 1\n- 2\n", "document 1 is not an object")):
        bad.write_text(content)
        run = inject_cli("-f", str(bad))
        assert run.returncode == 1 and message in run.stderr
    # Malformed objects: a message naming the object, not a traceback.
    for obj, message in (
            ({"kind": "Pod", "metadata": {"name": "p", "labels": ["a"]},
              "spec": {"containers": [{"name": "a", "image": "x"}]}}, "Pod/p: metadata.labels is not an object"),
            ({"kind": "Pod", "metadata": "p", "spec": {"containers": [{"name": "a", "image": "x"}]}},
             "metadata is not an object"),
            ({"kind": "List", "items": ["x"]}, "List/?: items is not a list of objects"),
            ({"kind": "List", "items": "x"}, "List/?: items is not a list of objects")):
        bad.write_text(json.dumps(obj))
        run = inject_cli("-f", str(bad))
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = inject_cli("-f", str(tmp_path / "missing.yaml"))
    assert run.returncode == 1 and "missing.yaml" in run.stderr


def test_serve_loads_no_kubernetes_code():
    """The k8s subcommands are imported when they run: `serve` (a sidecar in every
    pod) never pays for PyYAML, h11, cryptography or the injector."""
    code = ("import sys, conduit_sidecar.cli, conduit_sidecar.server; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'h11', 'cryptography') "
            "or m.startswith('conduit_sidecar.k8s.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_cli_has_the_subcommands():
    for command, flag in (("inject", "--filename"), ("inject-webhook", "--tls-cert")):
        run = subprocess.run(CLI + [command, "--help"], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0 and flag in run.stdout, run.stderr


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    """.dockerignore starts from nothing (`*`) and lets named files back in: one the
    Dockerfile copies but the list forgets fails `docker build` (`_tls.h` did)."""
    rules = [r.strip() for r in open(os.path.join(ROOT, ".dockerignore")) if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    let_in = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = []
    for line in open(os.path.join(ROOT, "Dockerfile")):
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied += [w.rstrip("/") for w in words[1:-1]]
    assert copied and {c for c in copied if c not in let_in} == set()
    assert all(os.path.exists(os.path.join(ROOT, c)) for c in copied)


def test_inject_file_keeps_unquoted_dates_as_kubernetes_reads_them(tmp_path):
    """YAML 1.1 reads an unquoted 2026-01-15 as a date: the value was written back
    changed (`2026-01-15 10:00:00+00:00`), and `-o json` died with a traceback.
    Kubernetes reads it as the string it is."""
    p = pod(annotations={"release-date": "DATE"},
            containers=[{"name": "app", "image": "app", "env": [{"name": "CUTOVER", "value": "STAMP"}]}])
    text = json.dumps(p).replace('"DATE"', "2026-01-15").replace('"STAMP"', "2026-01-15T10:00:00Z")
    source = tmp_path / "pod.yaml"
    source.write_text(text)
    for output in ("yaml", "json"):
        run = inject_cli("-f", str(source), "-o", output)
        assert run.returncode == 0, run.stderr
        obj = json.loads(run.stdout) if output == "json" else yaml.safe_load(run.stdout)
        assert obj["metadata"]["annotations"]["release-date"] == "2026-01-15"
        app = next(c for c in obj["spec"]["containers"] if c["name"] == "app")
        assert app["env"] == [{"name": "CUTOVER", "value": "2026-01-15T10:00:00Z"}]


def kubectl_reads(text: str, tmp_path: pathlib.Path) -> dict:
    """The object as kubectl reads it from YAML (sigs.k8s.io/yaml: Go's YAML, not 1.1)."""
    source = tmp_path / "read.yaml"
    source.write_text(text)
    run = subprocess.run([KUBECTL, "patch", "--local", "--type=json", "-f", str(source), "-p", "[]",
                          "-o", "json"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@needs_kubectl
def test_inject_file_output_reads_back_in_kubectl_as_its_input(tmp_path):
    """PyYAML writes YAML 1.1, kubectl reads Go's YAML: the strings "y", "n", "08" or a
    commit hash like "4417e53" came out unquoted, and kubectl read them as a bool and
    floats ("cannot unmarshal bool into ... annotations of type string"); on the way in,
    an unquoted 1:30 became 90 (YAML 1.1's base 60) and an unquoted = failed to load."""
    strings = ["y", "N", "08", "4417e53", "0o17", "0X1F", "1e3", ".5e3", "-1_0", "+.5", "yes", "~"]
    text = "\n".join([
        "apiVersion: v1", "kind: Pod",
        "metadata:", "  name: voice-agent", "  labels:", '    version: "4417e53"', "  annotations:",
        *(f"    s{i}: {json.dumps(s)}" for i, s in enumerate(strings)),
        "    at: 1:30", "    eq: =",
        "spec:", "  containers:", "  - name: app", "    image: node:20-slim", "    env:",
        '    - {name: DEBUG, value: "n"}', "    - {name: WINDOW, value: 12:30}", ""])
    want = kubectl_reads(text, tmp_path)
    assert want["metadata"]["annotations"]["at"] == "1:30" and want["metadata"]["annotations"]["eq"] == "="
    source = tmp_path / "pod.yaml"
    source.write_text(text)
    for output in ("yaml", "json"):
        run = inject_cli("-f", str(source), "-o", output)
        assert run.returncode == 0, run.stderr
        got = kubectl_reads(run.stdout, tmp_path)
        del got["metadata"]["annotations"]["conduit.dev/status"]
        assert got["metadata"] == want["metadata"]
        assert named(got["spec"]["containers"], "app") == want["spec"]["containers"]


def test_inject_file_takes_a_yaml_alias_as_a_copy(tmp_path):
    """Containers sharing env and volumeMounts through YAML aliases (&env, *env): PyYAML
    made one list of each, so in TLS mode every container's mount and NODE_EXTRA_CA_CERTS
    went into it once per container: /var/run/conduit mounted twice in each ("must be
    unique"). kubectl reads an alias as a copy of what it names."""
    text = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: voice}
spec:
  selector: {matchLabels: {app: voice}}
  template:
    metadata:
      labels: {app: voice}
      annotations: {conduit.dev/tls: "true"}
    spec:
      containers:
      - name: web
        image: node:20-slim
        env: &env [{name: OPENAI_BASE_URL, value: "https://127.0.0.1:8443/v1"}]
        volumeMounts: &mounts [{name: data, mountPath: /data}]
      - name: worker
        image: node:20-slim
        env: *env
        volumeMounts: *mounts
      volumes: [{name: data, emptyDir: {}}]
"""
    source = tmp_path / "deployment.yaml"
    source.write_text(text)
    run = inject_cli("-f", str(source))
    assert run.returncode == 0, run.stderr
    obj = yaml.safe_load(run.stdout)
    validate(obj)
    check_injected(pod_template(obj), tls=True)
    for app in pod_template(obj)["spec"]["containers"]:
        assert [m["mountPath"] for m in app["volumeMounts"]] == ["/data", "/var/run/conduit"]


def test_inject_file_refuses_excessive_aliasing(tmp_path):
    """Aliases copied are bounded: nine levels of ten aliases each ("billion laughs")
    would be 10^9 nodes, filling the memory of whoever runs the command."""
    lines = ['a0: &a0 ["x"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    source = tmp_path / "laughs.yaml"
    source.write_text("\n".join(lines) + "\n")
    run = inject_cli("-f", str(source))
    assert run.returncode == 1
    assert "excessive aliasing (over 1,000,000 nodes once aliases are copied)" in run.stderr
