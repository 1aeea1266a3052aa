"""Kubernetes: pod injection (`inject`), its offline command and its admission
webhook. Imported only by the `inject` and `inject-webhook` subcommands: `serve`
never loads it (nor PyYAML, h11 or cryptography through it)."""

# The subcommands conduit_sidecar.k8s.cli parses: name -> one-line help.
COMMANDS = {
    "inject": "inject the sidecar into Kubernetes YAML or JSON (offline)",
    "inject-webhook": "serve the pod-injection admission webhook (HTTPS)",
}
