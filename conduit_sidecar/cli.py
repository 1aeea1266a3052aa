"""The `conduit-sidecar` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import resource
import signal
import sys

import msgspec
import uvloop

from . import __version__, config as config_mod, k8s, logs
from .config import ConfigError
from .keys import KEY_PREFIX, KeyEntry, KeySet, hash_key, load_keys, new_key
from .policy import METRICS, WINDOWS, figure, price_for, window_bounds
from .providers import TEMPLATES
from .routing import RouteError, Router, masked

# --help's description: not __doc__, which -OO (the image's PYTHONOPTIMIZE=2) strips.
_DESCRIPTION = "The `conduit-sidecar` command."


def _config(path: str | None, overrides: dict | None = None) -> tuple[config_mod.Config, Router]:
    """The config and its providers; every error names the file first."""
    conf = config_mod.load(path, overrides)
    try:
        return conf, Router(conf)
    except ConfigError as exc:
        raise ConfigError(f"{config_mod.source(path)}: {exc}") from None


def _hold_standard_descriptors() -> None:
    """Descriptors 0-2 closed at start (`>&-`) held open on /dev/null: else the next
    file opened takes one (uvloop's epoll did), and libuv aborts the process when it
    closes a descriptor below 3. (Python, seeing no stdout, logs to stderr.)"""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one


def _raise_open_file_limit() -> None:
    """Each session holds two sockets, and a container runtime may set a soft limit of
    1024 (containerd 2.0: 1024 soft, 524288 hard): sessions ran out at about 500, with
    1014, and the circuit breaker rested the provider. Up to the hard limit, as Go's
    runtime and nginx's worker_rlimit_nofile do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(OSError, ValueError):  # (a hard limit past fs.nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(args) -> int:
    _hold_standard_descriptors()
    _raise_open_file_limit()
    # The image's entrypoint makes the sidecar PID 1, and the kernel drops a signal PID 1
    # has no handler for: a SIGTERM during start-up (a pod deleted as it starts) was
    # lost, and the kubelet waited out the grace period. Kept for Sidecar.run().
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: early.append(signum))
    try:
        conf, router = _config(
            args.config,
            overrides={"listen": args.listen, "keys_file": args.keys_file, "log_level": args.log_level},
        )
        keyset = load_keys(conf.keys_file)
    except ConfigError as exc:
        print(f"conduit-sidecar: {exc}", file=sys.stderr)
        return 1
    logs.setup(conf.log_level)
    for warning in _misspelt(router):
        logging.getLogger("conduit.config").warning(warning, extra={"event": "config_warning"})
    from .server import Sidecar

    try:
        return uvloop.run(Sidecar(conf, keyset, router).run(early))
    except ConfigError as exc:  # e.g. [tls] certificate files that do not load
        print(f"conduit-sidecar: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the listen address is taken
        print(f"conduit-sidecar: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _check_config(args) -> int:
    try:
        conf, router = _config(args.config)
        keyset = load_keys(conf.keys_file)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"listen        {conf.listen}")
    print(f"admin_listen  {conf.admin_listen}")
    if conf.tls:
        print(f"tls listen    {conf.tls.listen}")
    print(f"keys_file     {conf.keys_file} ({len(keyset)} keys)")
    for name in router.configured:
        url, headers = masked(router.routes[name].spec)
        models = ", ".join(router.routes[name].spec.models) or "-"
        print(f"provider      {name}: {url} headers={headers} models=[{models}]")
    for warning in (
        _misspelt(router)
        + _unreadable_secrets(router)
        + _unpriced(conf, router, keyset)
        + _unconfigured(router, keyset)
    ):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _misspelt(router: Router) -> list[str]:
    """config.misspelt, knowing the variables the providers read their secrets from."""
    secret_envs = {t.spec.secret_env for name in router.configured for t in router.routes[name].targets}
    return config_mod.misspelt(os.environ, {v for v in secret_envs if v})


def _unconfigured(router: Router, keyset: KeySet) -> list[str]:
    """Providers a key allows that this config does not set up (a typo, or another
    cluster's): that part of the key can never be used."""
    return [
        f"key {entry.id!r} allows provider {name!r}, which the config does not set up"
        for entry in keyset.by_id.values()
        for name in entry.allowed_providers or ()
        if name not in router.configured
    ]


def _unreadable_secrets(router: Router) -> list[str]:
    """Configured deployments whose secret cannot be read here: connects to them would
    fail as a configuration fault (1011 where no other deployment serves the session).
    A warning, not an error: the check may run where the Secret is not mounted. Names
    where the secret comes from, never the secret."""
    warnings = []
    for name in router.configured:
        route = router.routes[name]
        for target in route.targets:
            spec = target.spec
            if not (spec.secret_file or spec.secret_env):
                continue
            try:
                router.secret(spec)
            except RouteError as exc:  # its detail: where the secret is read, and why not
                where = f"provider {name!r}"
                if route.spec.deployments:
                    where += f" deployment {target.label}"
                warnings.append(
                    f"{where}: {exc.detail}: its connects would fail (1011 if nothing else serves)"
                )
    return warnings


def _unpriced(conf, router: Router, keyset: KeySet) -> list[str]:
    """Models a key with a `usd` budget may use but no [prices] entry covers: their
    usage would cost nothing against the budget."""
    warnings = []
    for entry in keyset.by_id.values():
        if not any(b.metric == "usd" for b in entry.budgets):
            continue
        patterns = entry.allowed_models
        if patterns is None:
            patterns = [m for name in router.configured for m in router.routes[name].spec.models]
        for pattern in patterns:
            # The pattern itself, `*` kept: a prefix price covers it only if it covers
            # every model it allows (an exact price for its bare prefix covers one).
            if price_for(conf.prices, pattern) is None:
                warnings.append(
                    f"key {entry.id!r} has a usd budget but model {pattern!r} has no [prices] entry"
                )
        if not patterns:
            warnings.append(
                f"key {entry.id!r} has a usd budget but may use any model: "
                "models without a [prices] entry cost nothing"
            )
    return warnings


def _usage(args) -> int:
    try:
        conf = config_mod.load(args.config)
        keyset = load_keys(conf.keys_file)
    except ConfigError as exc:
        print(f"conduit-sidecar: {exc}", file=sys.stderr)
        return 1
    if conf.state.backend != "redis":
        print(
            'conduit-sidecar: [state] backend = "local": each sidecar holds its own counts '
            "(see its /metrics); usage reads a shared backend",
            file=sys.stderr,
        )
        return 1
    entries = sorted(keyset.by_id.values(), key=lambda e: e.id)
    if args.key is not None:
        if KEY_PREFIX in args.key:  # a virtual key given for its id: never printed back
            digest = hash_key(args.key)
            entry = keyset.by_hash.get(digest)
            held = f"the key of id {entry.id!r}" if entry else f"not in {conf.keys_file}"
            print(
                f"conduit-sidecar: --key takes a key's id, not the key (sha256 {digest[:12]}...: {held})",
                file=sys.stderr,
            )
            return 1
        entries = [e for e in entries if e.id == args.key]
        if not entries:
            print(f"conduit-sidecar: no key {args.key!r} in {conf.keys_file}", file=sys.stderr)
            return 1
    from .state import RedisStore, StoreError

    try:
        store = RedisStore(conf.state)
    except ConfigError as exc:
        print(f"conduit-sidecar: {exc}", file=sys.stderr)
        return 1

    async def read():
        try:
            now = dt.datetime.now(dt.UTC)
            return now, [(e, await store.totals(e.id, now)) for e in entries]
        finally:
            await store.close()

    try:
        now, rows = asyncio.run(read())
    except StoreError as exc:
        print(f"conduit-sidecar: Redis at {store.where}: unavailable: {exc}", file=sys.stderr)
        return 1
    for entry, totals in rows:
        print(entry.id)
        limits = {(b.metric, b.window): b.limit for b in entry.budgets}
        for window in WINDOWS:
            resets = window_bounds(window, now)[1].strftime("%Y-%m-%dT%H:%M:%SZ")
            cells = []
            for metric in METRICS:
                value = totals[window][metric]
                cell = f"{metric} {value:.4f}" if metric == "usd" else f"{metric} {figure(value)}"
                if (metric, window) in limits:
                    cell += f" / {figure(limits[metric, window])}"
                cells.append(cell)
            print(f"  {window:5}  resets {resets}  " + "  ".join(cells))
    return 0


def _aware(when: dt.datetime) -> dt.datetime:
    """--expires without a time zone is UTC: the key file refuses a naive time."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


# The key-file field -> the `keys new` flag that sets it, to name in an error.
_KEY_FLAGS = {
    "id": "--id",
    "allowed_models": "--model",
    "allowed_providers": "--provider",
    "max_connections": "--max-connections",
    "expires_at": "--expires",
    "public_agents": "--public-agent",
}


def _keys_new(args) -> int:
    key = new_key()
    try:
        expires = _aware(dt.datetime.fromisoformat(args.expires)) if args.expires else None
    except ValueError as exc:
        print(f"conduit-sidecar: --expires: {exc}", file=sys.stderr)
        return 1
    try:
        entry = KeyEntry(
            id=args.id,
            sha256=hash_key(key),
            allowed_models=args.model or None,
            allowed_providers=args.provider or None,
            max_connections=args.max_connections,
            expires_at=expires,
            public_agents=args.public_agent or [],
        )
        entry = msgspec.convert(msgspec.to_builtins(entry), KeyEntry)  # validate
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("`$.")[2].partition("`")[0].partition("[")[0]
        print(f"conduit-sidecar: {_KEY_FLAGS.get(field, 'keys new')}: {exc}", file=sys.stderr)
        return 1
    line = msgspec.json.encode(entry).decode()
    if KEY_PREFIX in line:  # load_keys would refuse the file as holding a plaintext key
        print(
            f"conduit-sidecar: an id, model or agent holds {KEY_PREFIX!r}, a virtual key's prefix, "
            "which a key file refuses: pick another",
            file=sys.stderr,
        )
        return 1
    print(f"key: {key}")
    print("Shown once; give it to the app. Add this entry to the key file:")
    print(line)
    return 0


def _keys_hash(args) -> int:
    # From standard input when not given: a key on the command line is in the process
    # list while the command runs, and in the shell's history after. Typed at a
    # terminal: asked for, and not echoed.
    if args.key not in (None, "-"):
        key = args.key
    elif sys.stdin.isatty():
        import getpass  # here: serve does not load it

        key = getpass.getpass("virtual key: ").strip()
    else:
        key = sys.stdin.readline().strip()
    if not key:
        print("conduit-sidecar: no key given (as the argument, or a line on standard input)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _demo_seconds(text: str) -> float:
    """At least one 20 ms frame (a round trip to report), at most a minute (the tone is
    built in memory first)."""
    with contextlib.suppress(ValueError):
        if 0.02 <= float(text) <= 60:  # (nan compares false)
            return float(text)
    raise argparse.ArgumentTypeError(f"must be from 0.02 to 60, got {text!r}")


def _demo(args) -> int:
    from .demo import print_provider_summary, print_summary, run, run_provider

    if args.provider == "openai":
        print_summary(uvloop.run(run(args.seconds)))
    else:
        print_provider_summary(uvloop.run(run_provider(args.provider)))
    return 0


def _live_health(admin: str) -> dict[tuple[str, str], str]:
    """(provider, deployment) -> "healthy" | "resting", from a running sidecar's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(admin.rstrip("/") + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.labels["provider"], s.labels["deployment"]): "healthy" if s.value else "resting"
        for family in text_string_to_metric_families(text)
        if family.name == "conduit_deployment_healthy"
        for s in family.samples
    }


def _providers(args) -> int:
    try:
        _, router = _config(args.config)
        health = _live_health(args.admin) if args.admin else {}
    except ConfigError as exc:
        print(f"conduit-sidecar: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # urllib's errors are OSErrors; ValueError: no URL
        print(f"conduit-sidecar: cannot read {args.admin}/metrics: {exc}", file=sys.stderr)
        return 1
    width = max(12, *map(len, router.routes))  # the longest name, deepgram_agent included
    for name in sorted(router.routes):
        route = router.routes[name]
        url, headers = masked(route.spec)
        state = "configured" if name in router.configured else "needs a secret"
        # Without a deployments list the provider is its one deployment: its health here.
        live = "" if route.spec.deployments else health.get((name, route.targets[0].label), "")
        print(f"{name:{width}} {state:15} {url}" + (f" [{live}]" if live else ""))
        for header, value in headers.items():
            print(f"{'':{width}} {'':15} {header}: {value}")
        if route.spec.deployments:
            print(f"{'':{width}} {'':15} selection: {route.selection}")
            for target in route.targets:
                url, _ = masked(target.spec)
                live = health.get((name, target.label), "")
                print(
                    f"{'':{width}} {'':15} deployment {target.label} weight {target.weight} "
                    f"{url.replace('{resource}', target.spec.resource or '{resource}')}"
                    + (f" [{live}]" if live else "")
                )
    for pattern, names in router.model_routes.items():
        print(f"{'route':{width}} {pattern} -> {', '.join(names)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conduit-sidecar", description=_DESCRIPTION)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the sidecar")
    s.add_argument("--config")
    s.add_argument("--listen", metavar="HOST:PORT")
    s.add_argument("--keys-file", metavar="PATH")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)

    k = sub.add_parser("keys", help="make and hash virtual keys").add_subparsers(
        dest="keys_command", required=True
    )
    n = k.add_parser("new", help="print a new key once, and its key-file entry")
    n.add_argument("--id", required=True)
    n.add_argument("--model", action="append", metavar="PATTERN")
    n.add_argument("--provider", action="append", metavar="NAME")
    n.add_argument("--max-connections", type=int)
    n.add_argument("--expires", metavar="ISO8601", help="expiry time (UTC when it names no time zone)")
    n.add_argument("--public-agent", action="append", metavar="AGENT_ID")
    n.set_defaults(func=_keys_new)
    h = k.add_parser("hash", help="print the sha256 of a key")
    h.add_argument("key", nargs="?", help="the key; without it (or -), a line read from standard input")
    h.set_defaults(func=_keys_hash)

    c = sub.add_parser("check-config", help="validate config and key file")
    c.add_argument("--config")
    c.set_defaults(func=_check_config)

    u = sub.add_parser(
        "usage", help="each key's window totals, limits and reset times from the shared state backend"
    )
    u.add_argument("--config")
    u.add_argument("--key", metavar="ID")
    u.set_defaults(func=_usage)

    d = sub.add_parser("demo", help="run the sidecar with the built-in mock provider")
    d.add_argument("--seconds", type=_demo_seconds, default=3.0, help="audio to stream (0.02 to 60)")
    d.add_argument(
        "--provider",
        choices=tuple(TEMPLATES),  # the mock speaks each catalogued provider
        default="openai",
        help="the provider shape to demonstrate (its own paths, key form and events)",
    )
    d.set_defaults(func=_demo)

    v = sub.add_parser("providers", help="list provider templates and deployments (secrets masked)")
    v.add_argument("--config")
    v.add_argument(
        "--admin",
        metavar="URL",
        help="a running sidecar's admin address: show each deployment's health from its /metrics",
    )
    v.set_defaults(func=_providers)

    for name, text in k8s.COMMANDS.items():  # listed here, parsed by k8s.cli
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv=None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            if sys.stdout is not None:  # None: started with stdout closed
                sys.stdout.flush()  # here, not at exit: a reader gone (`| head -1`) is seen here
    except BrokenPipeError:
        # Python's "Note on SIGPIPE": no traceback, and stdout to devnull so that the
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in k8s.COMMANDS:
        # Imported only now: `serve` never loads the webhook's h11, PyYAML or cryptography.
        from .k8s.cli import main as k8s_main

        return k8s_main(argv)
    args = parser().parse_args(argv)
    return args.func(args)
