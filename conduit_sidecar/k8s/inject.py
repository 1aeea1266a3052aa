"""Pod injection: what the webhook and `conduit-sidecar inject -f` add to a pod.

Pure functions, no I/O. The single source of truth is `json_patch_for_pod`, which
returns RFC 6902 `add` operations; `inject_pod` and `inject_object` apply those same
operations to a copy, so the webhook and the offline command cannot drift apart.

What a pod gets (names and paths are the contract the manifests in k8s/ follow):

* the `conduit-sidecar` container: a native sidecar (first in `initContainers`, with
  `restartPolicy: Always`, Kubernetes >= 1.29) or, with
  `conduit.dev/native-sidecar: "false"`, a plain entry at the end of `containers`;
* volumes `conduit-keys` (Secret, mounted as a directory so that key rotations
  arrive), `conduit-providers` (Secret) and `conduit-config` (ConfigMap);
* with `conduit.dev/tls: "true"`: the loopback TLS listener with a self-signed CA,
  an emptyDir `conduit-ca` (the CA certificate: read-write in the sidecar, read-only
  in every app container) and an in-memory emptyDir `conduit-private` (the CA key:
  mounted by the sidecar only), and `NODE_EXTRA_CA_CERTS` on app containers whose
  `env` does not set it;
* the annotation `conduit.dev/status: injected`, and in TLS mode `conduit.dev/warning`
  when that `NODE_EXTRA_CA_CERTS` may override one an app container takes from
  `envFrom` (`injection_warnings`).

Per-pod settings come from the pod's annotations (`ANNOTATIONS`); a bad value raises
`InjectError`, whose message the webhook returns as the reason for `allowed: false`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from .. import __version__
from ..config import ADMIN_PORT, CONFIG_ENV, LISTEN_PORT, TLS_PORT, env_var

__all__ = [
    "ANNOTATIONS",
    "CONTAINER_NAME",
    "DEFAULT_IMAGE",
    "InjectError",
    "Settings",
    "inject_object",
    "inject_pod",
    "injection_warnings",
    "is_injected",
    "json_patch_for_pod",
    "settings_from_annotations",
    "sidecar_container",
]

PREFIX = "conduit.dev/"
CONTAINER_NAME = "conduit-sidecar"
STATUS_ANNOTATION = PREFIX + "status"
WARNING_ANNOTATION = PREFIX + "warning"
INJECT_LABEL = PREFIX + "inject"
DEFAULT_IMAGE = f"conduit-sidecar:{__version__}"

CONFIG_DIR = "/etc/conduit/config"
KEYS_DIR = "/etc/conduit/keys"
PROVIDERS_DIR = "/etc/conduit/providers"
CA_DIR = "/var/run/conduit"
PRIVATE_DIR = "/var/run/conduit-private"
CA_FILE = CA_DIR + "/ca.pem"
RUN_AS = 10001
# Characters of a pod's own value (an annotation, a container name) that a message
# quotes: a value may be megabytes, and the message is the webhook's answer and log line.
_SHOWN = 64
# In TLS mode each app container costs two patch operations, ~2 KiB of the webhook's
# memory while it answers: 2 MiB of empty containers (`{}`) took 1 GiB of its 128Mi.
MAX_CONTAINERS = 1000

# Kinds with a pod template, and the keys leading to the object that holds `template`.
TEMPLATE_PARENTS = {
    "Deployment": ("spec",),
    "StatefulSet": ("spec",),
    "DaemonSet": ("spec",),
    "ReplicaSet": ("spec",),
    "Job": ("spec",),
    "CronJob": ("spec", "jobTemplate", "spec"),
}


class InjectError(ValueError):
    """A pod that cannot be injected as asked; the message says which annotation or
    field is wrong and why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    image: str = DEFAULT_IMAGE
    native_sidecar: bool = True
    tls: bool = False
    listen_port: int = LISTEN_PORT
    admin_port: int = ADMIN_PORT
    tls_port: int = TLS_PORT
    keys_secret: str = "conduit-keys"
    provider_secret: str = "conduit-provider"
    config_map: str = "conduit-config"
    cpu_request: str = "50m"
    cpu_limit: str | None = None  # no CPU limit by default: throttling adds latency
    memory_request: str = "64Mi"
    memory_limit: str = "128Mi"


# Kubernetes resource.Quantity, e.g. 50m, 0.5, 128Mi, 1G, 1e3.
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")
# A DNS-1123 subdomain, what Secret and ConfigMap names must be.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# An image reference: no whitespace or control characters; registry, path, tag, digest.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]*$")


def _shown(value) -> str:
    """`value`'s repr for a message, at most _SHOWN characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError('must be "true" or "false"')
    return value == "true"


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return int(value)


def _quantity(value: str) -> str:
    if not _QUANTITY.fullmatch(value):  # match's $ allows a final newline
        raise ValueError("must be a Kubernetes quantity such as 50m, 0.5, 64Mi or 1Gi")
    return value


def _name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError("must be a Kubernetes object name (lowercase DNS subdomain)")
    return value


def _image(value: str) -> str:
    if len(value) > 512 or not _IMAGE.fullmatch(value):
        raise ValueError("must be an image reference such as registry.example.com/conduit-sidecar:0.1.0")
    return value


# Annotation -> (Settings field, parser). The table in docs/kubernetes.md lists these.
ANNOTATIONS = {
    PREFIX + "image": ("image", _image),
    PREFIX + "native-sidecar": ("native_sidecar", _bool),
    PREFIX + "tls": ("tls", _bool),
    PREFIX + "listen-port": ("listen_port", _port),
    PREFIX + "admin-port": ("admin_port", _port),
    PREFIX + "tls-port": ("tls_port", _port),
    PREFIX + "keys-secret": ("keys_secret", _name),
    PREFIX + "provider-secret": ("provider_secret", _name),
    PREFIX + "config-map": ("config_map", _name),
    PREFIX + "cpu-request": ("cpu_request", _quantity),
    PREFIX + "cpu-limit": ("cpu_limit", _quantity),
    PREFIX + "memory-request": ("memory_request", _quantity),
    PREFIX + "memory-limit": ("memory_limit", _quantity),
}
# Annotations of ours that are not settings; any other conduit.dev/ key is a typo.
_KNOWN = set(ANNOTATIONS) | {STATUS_ANNOTATION, WARNING_ANNOTATION, INJECT_LABEL}


def settings_from_annotations(
    annotations: Mapping[str, str] | None, defaults: Settings = Settings()
) -> Settings:
    """The settings for one pod: `defaults` overridden by its conduit.dev/ annotations."""
    changes: dict[str, Any] = {}  # each value of its field's type (ANNOTATIONS parses it)
    for key, value in (annotations or {}).items():
        if not key.startswith(PREFIX):
            continue
        if key not in _KNOWN:
            raise InjectError(f"unknown annotation {_shown(key)}; known: {', '.join(sorted(ANNOTATIONS))}")
        if key not in ANNOTATIONS:
            continue
        field, parse = ANNOTATIONS[key]
        if not isinstance(value, str):
            raise InjectError(f"annotation {key!r}: value must be a string, got {_shown(value)}")
        try:
            changes[field] = parse(value)
        except ValueError as exc:
            raise InjectError(f"annotation {key!r}: {exc}, got {_shown(value)}") from None
    settings = dataclasses.replace(defaults, **changes)
    ports = {settings.listen_port, settings.admin_port} | ({settings.tls_port} if settings.tls else set())
    if len(ports) != (3 if settings.tls else 2):
        raise InjectError("conduit.dev/listen-port, admin-port and tls-port must differ")
    return settings


def _check_shape(pod: Mapping) -> None:
    """The fields we read or patch have the types the API gives them, so that a
    malformed object yields InjectError rather than a crash."""

    def is_list_of_objects(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, Mapping) for v in value)

    if not isinstance(pod, Mapping):
        raise InjectError("the object is not a JSON object")
    metadata = pod.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InjectError("metadata is not an object")
    if not isinstance((metadata or {}).get("annotations") or {}, Mapping):
        raise InjectError("metadata.annotations is not an object")
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        raise InjectError("the pod has no spec")
    if not spec.get("containers") or not is_list_of_objects(spec["containers"]):
        raise InjectError("spec.containers is missing or not a list of containers")
    for key in ("initContainers", "volumes"):
        if spec.get(key) is not None and not is_list_of_objects(spec[key]):
            raise InjectError(f"spec.{key} is not a list of objects")
    if len(spec["containers"]) > MAX_CONTAINERS:
        raise InjectError(f"the pod has {len(spec['containers'])} containers, more than {MAX_CONTAINERS}")
    for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
        for key in ("env", "envFrom", "volumeMounts", "ports"):
            if c.get(key) is not None and not is_list_of_objects(c[key]):
                raise InjectError(f"container {_shown(c.get('name'))}: {key} is not a list of objects")


def is_injected(pod: Mapping) -> bool:
    """Injected before: by our status annotation or a container of our name."""
    metadata = pod.get("metadata") or {}
    if STATUS_ANNOTATION in (metadata.get("annotations") or {}):
        return True
    spec = pod.get("spec") or {}
    return any(
        c.get("name") == CONTAINER_NAME
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
    )


def sidecar_container(s: Settings) -> dict:
    """The sidecar container for these settings."""
    env = [
        {"name": CONFIG_ENV, "value": CONFIG_DIR + "/config.toml"},
        {"name": env_var(None, "keys_file"), "value": KEYS_DIR + "/keys.json"},
        {"name": env_var(None, "listen"), "value": f"127.0.0.1:{s.listen_port}"},
        # The kubelet's probes and Prometheus reach the admin port from outside the pod;
        # POST /drain answers only loopback. No preStop hook drains: the kubelet runs a
        # native sidecar's at the start of the pod's end, while the app still runs, and
        # a drain then would refuse the app's sessions (or end an idle sidecar at once).
        # SIGTERM drains, and reaches a native sidecar only once the app has exited.
        {"name": env_var(None, "admin_listen"), "value": f"*:{s.admin_port}"},
    ]
    ports = [
        {"name": "conduit", "containerPort": s.listen_port, "protocol": "TCP"},
        {"name": "conduit-metrics", "containerPort": s.admin_port, "protocol": "TCP"},
    ]
    mounts = [
        {"name": "conduit-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "conduit-keys", "mountPath": KEYS_DIR, "readOnly": True},
        {"name": "conduit-providers", "mountPath": PROVIDERS_DIR, "readOnly": True},
    ]
    if s.tls:
        env += [
            {"name": env_var("tls", "self_signed"), "value": "1"},
            {"name": env_var("tls", "listen"), "value": f"127.0.0.1:{s.tls_port}"},
            {"name": env_var("tls", "ca_out"), "value": CA_FILE},
            {"name": env_var("tls", "state_dir"), "value": PRIVATE_DIR},
        ]
        ports.append({"name": "conduit-tls", "containerPort": s.tls_port, "protocol": "TCP"})
        mounts += [
            {"name": "conduit-ca", "mountPath": CA_DIR},
            {"name": "conduit-private", "mountPath": PRIVATE_DIR},
        ]
    resources = {
        "requests": {"cpu": s.cpu_request, "memory": s.memory_request},
        "limits": {"memory": s.memory_limit},
    }
    if s.cpu_limit:
        resources["limits"]["cpu"] = s.cpu_limit
    container = {
        "name": CONTAINER_NAME,
        "image": s.image,
        "args": ["serve"],
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "resources": resources,
        # The app starts only once the sidecar is ready (native sidecars gate later
        # containers on their startup probe).
        "startupProbe": _probe("/readyz", period=1, failures=30),
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if s.native_sidecar:
        container["restartPolicy"] = "Always"
    return container


def _probe(path: str, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": "conduit-metrics"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def _volumes(s: Settings) -> list[dict]:
    volumes = [
        {"name": "conduit-config", "configMap": {"name": s.config_map}},
        {"name": "conduit-keys", "secret": {"secretName": s.keys_secret}},
        {"name": "conduit-providers", "secret": {"secretName": s.provider_secret}},
    ]
    if s.tls:
        volumes += [
            {"name": "conduit-ca", "emptyDir": {"sizeLimit": "1Mi"}},
            # The CA key lives in memory only, for the pod's lifetime, so a
            # restarted sidecar reuses the CA the app already trusts.
            {"name": "conduit-private", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ]
    return volumes


def _escape(token: str) -> str:
    """A JSON Pointer reference token (RFC 6901): `~` -> `~0`, `/` -> `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


def _append(ops: list, parent: Mapping, path: str, key: str, items: list) -> None:
    """Append items to parent[key], adding the whole list if it is missing: JSON
    Patch cannot append with `/-` to an array that is not there."""
    if parent.get(key):
        ops.extend({"op": "add", "path": f"{path}/{key}/-", "value": item} for item in items)
    else:
        ops.append({"op": "add", "path": f"{path}/{key}", "value": items})


def _tcp_ports(c: Mapping):
    """(port, "declares" or "probes"): the TCP ports a container listens on, as far as
    its spec tells. Declaring a port is optional: many apps name theirs only in probes."""
    for p in c.get("ports") or []:
        if p.get("protocol", "TCP") == "TCP" and isinstance(p.get("containerPort"), int):
            yield p["containerPort"], "declares"
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(kind)
        for handler in ("httpGet", "tcpSocket", "grpc"):
            action = probe.get(handler) if isinstance(probe, Mapping) else None
            if isinstance(action, Mapping) and isinstance(action.get("port"), int):
                yield action["port"], "probes"


def _check_conflicts(spec: Mapping, s: Settings) -> None:
    if spec.get("hostNetwork") is True:
        # The pod's loopback would be the node's: every process on it could use the
        # sidecar's keys and drain it, and its ports would be the node's.
        raise InjectError("the pod uses hostNetwork: the conduit sidecar needs a pod network of its own")
    pod_os = spec.get("os")
    if isinstance(pod_os, Mapping) and pod_os.get("name") == "windows":
        # The image is Linux's, and the API server forbids the sidecar's securityContext
        # (capabilities, seccompProfile, runAsUser...) on a Windows pod: it would refuse
        # the injected pod for fields its author never wrote.
        raise InjectError("the pod runs on Windows (spec.os.name): the conduit sidecar is a Linux container")
    ports = {s.listen_port: "conduit.dev/listen-port", s.admin_port: "conduit.dev/admin-port"}
    if s.tls:
        ports[s.tls_port] = "conduit.dev/tls-port"
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for port, how in _tcp_ports(c):
            if port in ports:
                raise InjectError(
                    f"container {_shown(c.get('name'))} {how} port {port}, which the conduit sidecar "
                    f"listens on: set {ports[port]} to another port"
                )
    ours = {v["name"] for v in _volumes(s)}
    taken = ours & {v.get("name") for v in spec.get("volumes") or [] if isinstance(v.get("name"), str)}
    if taken:
        raise InjectError(
            f"the pod already has volumes named {', '.join(sorted(taken))}, which the conduit sidecar needs"
        )
    if s.tls:
        for c in spec.get("containers") or []:
            if any(m.get("mountPath") == CA_DIR for m in c.get("volumeMounts") or []):
                raise InjectError(
                    f"container {_shown(c.get('name'))} already mounts {CA_DIR}, "
                    "where conduit.dev/tls puts the sidecar's CA"
                )


def json_patch_for_pod(pod: Mapping, defaults: Settings = Settings()) -> list[dict]:
    """RFC 6902 operations that inject the sidecar into `pod` (a Pod, or a pod
    template: `metadata` + `spec`). Empty if the pod is injected already.

    Raises InjectError for a bad annotation or a pod that conflicts with the sidecar.
    """
    _check_shape(pod)
    if is_injected(pod):
        return []
    metadata = pod.get("metadata") or {}
    spec = pod["spec"]
    s = settings_from_annotations(metadata.get("annotations"), defaults)
    _check_conflicts(spec, s)

    ops: list[dict] = []
    sidecar = sidecar_container(s)
    if s.native_sidecar:
        if spec.get("initContainers"):
            # First, so that it is up before the other init containers and the app.
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
    _append(ops, spec, "/spec", "volumes", _volumes(s))
    if s.tls:
        for i, c in enumerate(spec["containers"]):
            path = f"/spec/containers/{i}"
            _append(
                ops, c, path, "volumeMounts", [{"name": "conduit-ca", "mountPath": CA_DIR, "readOnly": True}]
            )
            if not _sets_ca_env(c):
                _append(ops, c, path, "env", [{"name": "NODE_EXTRA_CA_CERTS", "value": CA_FILE}])
    annotations = {STATUS_ANNOTATION: "injected"}
    if warnings := _warnings(spec, s):
        annotations[WARNING_ANNOTATION] = "; ".join(warnings)
    if "metadata" not in pod or pod["metadata"] is None:
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": annotations}})
    elif not metadata.get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
    else:
        for key, value in annotations.items():
            ops.append({"op": "add", "path": "/metadata/annotations/" + _escape(key), "value": value})
    return ops


def injection_warnings(pod: Mapping, defaults: Settings = Settings()) -> list[str]:
    """What the injection of `pod` (checked by json_patch_for_pod) may change that the
    pod's author did not see: the webhook returns them as admission warnings, and
    the pod keeps them in its `conduit.dev/warning` annotation."""
    if is_injected(pod):
        return []
    s = settings_from_annotations((pod.get("metadata") or {}).get("annotations"), defaults)
    return _warnings(pod["spec"], s)


def _warnings(spec: Mapping, s: Settings) -> list[str]:
    if not s.tls:
        return []
    # Kubernetes gives `env` precedence over `envFrom`, whose ConfigMaps and Secrets the
    # injector cannot read: the entry added for the sidecar's CA may replace the app's
    # own (a corporate proxy's CA), and one file cannot name both.
    names = [
        str(c.get("name"))[:_SHOWN]
        for c in spec["containers"]
        if not _sets_ca_env(c)
        and any(
            isinstance(source.get("prefix") or "", str)
            and "NODE_EXTRA_CA_CERTS".startswith(source.get("prefix") or "")
            for source in c.get("envFrom") or []
        )
    ]
    if not names:
        return []
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return [
        f"container{'s' if len(names) > 1 else ''} {shown} take{'' if len(names) > 1 else 's'} "
        f"variables from envFrom: a NODE_EXTRA_CA_CERTS there is overridden by the injected "
        f"{CA_FILE} (to keep it, set it in env, as $(NODE_EXTRA_CA_CERTS); that file must "
        "then hold the sidecar's CA too)"
    ]


def _sets_ca_env(container: Mapping) -> bool:
    """The container's own `env` sets NODE_EXTRA_CA_CERTS: left as it is."""
    return any(e.get("name") == "NODE_EXTRA_CA_CERTS" for e in container.get("env") or [])


def _apply_add(doc: dict, ops: list[dict]) -> dict:
    """Apply RFC 6902 `add` operations (the only kind json_patch_for_pod makes)."""
    for op in ops:
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        target = doc
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        value = copy.deepcopy(op["value"])
        if isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), value)
        else:
            target[last] = value
    return doc


def inject_pod(pod: Mapping, defaults: Settings = Settings()) -> dict:
    """A copy of `pod` (or pod template) with the sidecar injected."""
    return _apply_add(copy.deepcopy(dict(pod)), json_patch_for_pod(pod, defaults))


def inject_object(obj: Mapping, defaults: Settings = Settings()) -> dict:
    """A copy of a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob
    or List of them with every pod template injected. Other kinds, and pods labelled
    `conduit.dev/inject: "false"`, come back unchanged."""
    kind = obj.get("kind")
    if kind == "List":
        items = obj.get("items") or []
        if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
            raise InjectError("items is not a list of objects")
        return {**obj, "items": [inject_object(item, defaults) for item in items]}
    if kind == "Pod":
        return dict(obj) if _opted_out(obj) else inject_pod(obj, defaults)
    if kind not in TEMPLATE_PARENTS:
        return dict(obj)
    copied = copy.deepcopy(dict(obj))
    parent: Any = copied
    for key in TEMPLATE_PARENTS[kind]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or not isinstance(parent.get("template"), dict):
        where = ".".join(TEMPLATE_PARENTS[kind])
        raise InjectError(f"{kind} has no pod template at {where}.template")
    if not _opted_out(parent["template"]):
        parent["template"] = inject_pod(parent["template"], defaults)
    return copied


def _opted_out(pod: Mapping) -> bool:
    metadata = pod.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise InjectError("metadata is not an object")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise InjectError("metadata.labels is not an object")
    return labels.get(INJECT_LABEL) == "false"
