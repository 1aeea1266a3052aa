"""The pod-injection admission webhook: `conduit-sidecar inject-webhook`.

An HTTPS server for the Kubernetes API server. `POST /mutate` takes an
AdmissionReview (admission.k8s.io/v1) for a pod CREATE and answers with the JSON
Patch from `inject.json_patch_for_pod`; `GET /healthz` answers `ok`.

Answers: a pod that cannot be injected (bad annotation, malformed pod) is refused
with `allowed: false` and the reason; a review without a `request.uid` or a body that
is not JSON gets HTTP 400, an oversized body 413. Nothing a client sends makes it
answer 500 or stop.

The TLS certificate and key are re-read when their files change (cert-manager
renews them in place), checked at each new connection. The TLS handshake runs in the
connection's own thread with a timeout, so a slow client cannot hold up the others.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .. import logs
from ..config import TLS_PORT, split_hostport
from .inject import DEFAULT_IMAGE, InjectError, Settings, json_patch_for_pod

__all__ = ["MAX_BODY", "WebhookServer", "add_arguments", "main", "review_response", "run"]

log = logging.getLogger("conduit.webhook")

MAX_BODY = 2 << 20            # a pod is at most 1.5 MiB (etcd's limit), plus the review around it
IO_TIMEOUT = 10.0             # seconds per read or write, handshake included


class BadReview(ValueError):
    """A request too malformed to answer with an AdmissionReview (HTTP 400)."""


def review_response(review, defaults: Settings = Settings()) -> dict:
    """The AdmissionReview answering `review` (already decoded from JSON).

    Raises BadReview when there is no `request.uid` to answer to.
    """
    request = review.get("request") if isinstance(review, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    if not isinstance(uid, str) or not uid:
        raise BadReview("not an AdmissionReview: request.uid is missing")
    response: dict = {"uid": uid, "allowed": True}
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        _deny(response, "expected apiVersion admission.k8s.io/v1, kind AdmissionReview")
    elif _kind(request) != "Pod" or request.get("operation") != "CREATE":
        pass    # not ours to change: the webhook rules send only pod CREATEs
    else:
        pod = request.get("object")
        where = f"{request.get('namespace') or '-'}/{_pod_name(pod)}"
        try:
            if not isinstance(pod, dict):
                raise InjectError("request.object is not a pod")
            patch = json_patch_for_pod(pod, defaults)
        except InjectError as exc:
            _deny(response, f"conduit-sidecar injection: {exc}")
            log.info("denied", extra={"event": "deny", "pod": where, "reason": str(exc)})
        except Exception:
            # A bug of ours: refuse this pod with a reason rather than fail the request.
            log.exception("injection failed", extra={"event": "error", "pod": where})
            _deny(response, "conduit-sidecar injection: internal error (see the webhook's log)")
        else:
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
            log.info("injected" if patch else "already injected",
                     extra={"event": "admit", "pod": where, "operations": len(patch)})
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _deny(response: dict, message: str) -> None:
    response["allowed"] = False
    response["status"] = {"code": 400, "reason": "BadRequest", "message": message}


def _kind(request: dict):
    kind = request.get("kind")
    return kind.get("kind") if isinstance(kind, dict) else None


def _pod_name(pod) -> str:
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    if not isinstance(metadata, dict):
        return "-"
    return str(metadata.get("name") or (metadata.get("generateName") or "-") + "*")


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"     # keep-alive: the API server reuses connections
    timeout = IO_TIMEOUT

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self):
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):
            self.close_connection = True
            return self._send(411, b"Content-Length required\n", "text/plain")
        if int(length) > MAX_BODY:
            self.close_connection = True
            return self._send(413, f"request body over {MAX_BODY >> 20} MiB\n".encode(), "text/plain")
        # Read the body even for a wrong path: closing with unread input resets the
        # connection, and the client could lose the answer.
        body = self.rfile.read(int(length))
        if self.path.split("?", 1)[0] != "/mutate":
            return self._send(404, b"not found\n", "text/plain")
        try:
            review = json.loads(body)
            answer = review_response(review, self.server.defaults)
        except (ValueError, RecursionError) as exc:     # JSONDecodeError and BadReview
            log.info("bad review", extra={"event": "bad_request", "error": str(exc)[:200]})
            return self._send(400, f"{exc}\n".encode(), "text/plain")
        self._send(200, json.dumps(answer).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        """Access lines go to debug: /healthz probes would flood the info log."""
        log.debug(format % args)


class WebhookServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that does TLS per connection, in the connection's thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], cert_file: str, key_file: str,
                 defaults: Settings = Settings()):
        self.cert_file, self.key_file, self.defaults = cert_file, key_file, defaults
        self._context_lock = threading.Lock()
        self._loaded: tuple | None = None
        self._context = self._current_context()    # fail at start on a bad cert or key
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def _current_context(self) -> ssl.SSLContext:
        with self._context_lock:
            stamp = tuple(os.stat(f).st_mtime_ns for f in (self.cert_file, self.key_file))
            if stamp != self._loaded:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(self.cert_file, self.key_file)
                if self._loaded is not None:
                    log.info("certificate reloaded", extra={"event": "cert_reload"})
                self._context, self._loaded = context, stamp
            return self._context

    def finish_request(self, request, client_address):
        request.settimeout(IO_TIMEOUT)
        try:
            context = self._current_context()
        except (OSError, ssl.SSLError) as exc:
            # A half-written renewal: keep serving with the previous certificate.
            log.warning("certificate reload failed", extra={"event": "cert_reload", "error": str(exc)})
            context = self._context
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("TLS handshake failed", extra={"peer": client_address[0], "error": str(exc)})
            return
        with tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request, client_address):
        log.warning("connection error", exc_info=True, extra={"peer": client_address[0]})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", required=True, metavar="FILE", help="PEM certificate (chain)")
    p.add_argument("--tls-key", required=True, metavar="FILE", help="PEM private key")
    p.add_argument("--listen", default=f"0.0.0.0:{TLS_PORT}", metavar="HOST:PORT")
    p.add_argument("--sidecar-image", default=os.environ.get("CONDUIT_SIDECAR_IMAGE", DEFAULT_IMAGE),
                   metavar="IMAGE",
                   help="image of the injected sidecar (default: $CONDUIT_SIDECAR_IMAGE or %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    logs.setup(args.log_level)
    try:
        address = split_hostport(args.listen)
        server = WebhookServer(address, args.tls_cert, args.tls_key,
                               Settings(image=args.sidecar_image))
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"conduit-sidecar inject-webhook: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="webhook", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("listening", extra={"event": "listen", "address": f"{host}:{port}",
                                 "sidecar_image": args.sidecar_image})
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="conduit-sidecar inject-webhook", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
