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
import re
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
    except UnicodeDecodeError:
        print(f"conduit-sidecar: {args.filename}: not UTF-8 text", file=sys.stderr)
        return 1
    try:  # JSON is YAML too
        budget = [_EXPANDED_MAX]
        documents = [_expanded(d, budget) for d in yaml.load_all(text, Loader=_loader()) if d is not None]
    except yaml.YAMLError as exc:
        print(f"conduit-sidecar: {args.filename}: not valid YAML or JSON: {_where(exc)}", file=sys.stderr)
        return 1
    except RecursionError:
        print(f"conduit-sidecar: {args.filename}: an alias names a node it is part of", file=sys.stderr)
        return 1
    except _Excessive:
        print(
            f"conduit-sidecar: {args.filename}: excessive aliasing (over {_EXPANDED_MAX:,} nodes "
            "once aliases are copied)",
            file=sys.stderr,
        )
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
        sys.stdout.write(yaml.dump_all(injected, Dumper=_dumper(), sort_keys=False))
    return 0


# Copies of aliases, in nodes, across a file: aliases of aliases grow exponentially
# ("billion laughs"); Go's YAML, which kubectl reads with, refuses those too.
_EXPANDED_MAX = 1_000_000


class _Excessive(Exception):
    pass


def _expanded(value, budget: list[int]):
    """`value` with each YAML alias a copy of what it names, as kubectl reads it: PyYAML
    gives one object for both places, so a mount added to one container whose
    volumeMounts was an alias went into the other too. `budget`: nodes left to make."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Excessive
    if isinstance(value, dict):
        return {key: _expanded(v, budget) for key, v in value.items()}
    if isinstance(value, list):
        return [_expanded(v, budget) for v in value]
    return value


# kubectl reads YAML with Go's yaml.v2 (sigs.k8s.io/yaml), not YAML 1.1 as PyYAML:
# where they differ, `inject` reads as kubectl and writes what kubectl reads back.
_STR, _INT, _FLOAT = "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_GO_BOOLS = {"y", "Y", "n", "N"}
# What Go takes for a number (after removing every `_`), a superset is fine: 08, 0o17,
# 1e3 (a commit hash such as 4417e53), .5e3... YAML 1.1 reads these as strings.
_GO_NUMBER = re.compile(r"[-+]?(0[xXoObB][0-9a-fA-F]+|(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)")


def _where(exc) -> str:
    """A YAML error's problem and line, as kubectl names one: PyYAML's own text quotes
    the lines around it, which can hold a Secret's value or an env var's, and its
    problem may quote a name read from them (an unquoted value `*...` is an alias)."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = re.split("['\"]", exc.problem or exc.context or "invalid", maxsplit=1)[0].rstrip()
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
    return str(exc)  # a ReaderError: the offending character's code and position


def _loader() -> type:
    """PyYAML's safe loader, reading as kubectl does: an unquoted `2026-01-15` is the
    string it is (a date object would be written back changed, or fail JSON output),
    `1:30` is not YAML 1.1's base-60 90, and `=` is a string (PyYAML fails on it)."""
    import yaml

    dropped = ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag not in dropped]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

        def resolve(self, kind, value, implicit):
            tag = super().resolve(kind, value, implicit)
            if kind is yaml.ScalarNode and tag in (_INT, _FLOAT) and ":" in value:
                return _STR  # only base 60 has a colon
            return tag

    return Loader


def _dumper() -> type:
    """PyYAML's safe dumper, quoting each string that kubectl would read as a bool or a
    number: `y`, `n`, `08`, `4417e53` came out plain, and `kubectl apply` read them so."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def resolve(self, kind, value, implicit):
            tag = super().resolve(kind, value, implicit)
            if kind is yaml.ScalarNode and implicit[0] and tag == _STR:
                if value in _GO_BOOLS or _GO_NUMBER.fullmatch(value.replace("_", "")):
                    return None  # not plain: the emitter quotes it
            return tag

    return Dumper
