"""The `inject` and `inject-webhook` subcommands (conduit_sidecar.cli hands them
their arguments, importing this module only when one of them runs).

`conduit-sidecar inject -f FILE` injects the sidecar offline, like
`istioctl kube-inject`: it reads YAML (several documents allowed) or JSON, `-` for
standard input, and prints every object with its pod templates injected:

    conduit-sidecar inject -f deployment.yaml | kubectl apply -f -
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__
from . import COMMANDS, webhook
from .inject import DEFAULT_IMAGE, InjectError, Settings, inject_object

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run `argv` (["inject", ...] or ["inject-webhook", ...])."""
    p = argparse.ArgumentParser(prog="conduit-sidecar")
    p.add_argument("--version", action="version", version=__version__)
    subparsers = p.add_subparsers(dest="command", required=True)
    i = subparsers.add_parser("inject", help=COMMANDS["inject"])
    i.add_argument("-f", "--filename", required=True, metavar="FILE", help="YAML or JSON file, - for stdin")
    i.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    i.add_argument(
        "--sidecar-image",
        default=os.environ.get("CONDUIT_SIDECAR_IMAGE", DEFAULT_IMAGE),
        metavar="IMAGE",
        help="image of the injected sidecar (default: $CONDUIT_SIDECAR_IMAGE or %(default)s)",
    )
    i.set_defaults(func=_inject)

    w = subparsers.add_parser("inject-webhook", help=COMMANDS["inject-webhook"])
    webhook.add_arguments(w)
    w.set_defaults(func=webhook.run)
    args = p.parse_args(argv)
    return args.func(args)


def _inject(args: argparse.Namespace) -> int:
    import yaml  # PyYAML: only this command reads YAML

    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        print(f"conduit-sidecar: {args.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    try:  # JSON is YAML too
        documents = [d for d in yaml.load_all(text, Loader=_loader()) if d is not None]
    except yaml.YAMLError as exc:
        print(f"conduit-sidecar: {args.filename}: not valid YAML or JSON: {exc}", file=sys.stderr)
        return 1
    defaults = Settings(image=args.sidecar_image)
    injected = []
    for n, doc in enumerate(documents, 1):
        if not isinstance(doc, dict):
            print(f"conduit-sidecar: {args.filename}: document {n} is not an object", file=sys.stderr)
            return 1
        try:
            injected.append(inject_object(doc, defaults))
        except InjectError as exc:
            metadata = doc.get("metadata")
            name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
            print(f"conduit-sidecar: {args.filename}: {doc.get('kind')}/{name}: {exc}", file=sys.stderr)
            return 1
    if args.output == "json":
        if len(injected) != 1:
            injected = [{"apiVersion": "v1", "kind": "List", "items": injected}]
        print(json.dumps(injected[0], indent=2))
    else:
        sys.stdout.write(yaml.safe_dump_all(injected, sort_keys=False))
    return 0


def _loader() -> type:
    """PyYAML's safe loader without YAML 1.1's timestamps: Kubernetes reads an unquoted
    `2026-01-15` as the string it is, and a date object would be written back changed
    (or fail JSON output)."""
    import yaml

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

    return Loader
