"""The command line: keys, check-config, providers, demo (the README's first command)."""

import json
import os
import subprocess
import sys

import pytest

from conduit_sidecar.keys import hash_key


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "conduit_sidecar", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_keys_new_prints_a_key_once_and_its_hash_entry():
    r = cli("keys", "new", "--id", "team-a", "--model", "gpt-realtime*", "--provider", "openai",
            "--max-connections", "5", "--expires", "2027-01-01T00:00:00Z")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    key = lines[0].removeprefix("key: ")
    assert key.startswith("condt_") and len(key) >= 6 + 43           # 256 bits, base64url
    entry = json.loads(lines[-1])
    assert entry == {"id": "team-a", "sha256": hash_key(key), "expires_at": "2027-01-01T00:00:00Z",
                     "allowed_models": ["gpt-realtime*"], "allowed_providers": ["openai"],
                     "max_connections": 5}
    assert key not in lines[-1]
    assert cli("keys", "hash", key).stdout.strip() == hash_key(key)
    # From standard input, out of the process list and the shell's history.
    for args in (("keys", "hash"), ("keys", "hash", "-")):
        r = subprocess.run([sys.executable, "-m", "conduit_sidecar", *args], input=key + "\n",
                           capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout.strip()) == (0, hash_key(key)), r.stderr
    r = subprocess.run([sys.executable, "-m", "conduit_sidecar", "keys", "hash"], input="",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no key given" in r.stderr
    assert cli("keys", "new", "--id", "x").stdout.splitlines()[0] != lines[0]
    public = cli("keys", "new", "--id", "web", "--public-agent", "agent_a", "--public-agent", "agent_b")
    assert json.loads(public.stdout.splitlines()[-1])["public_agents"] == ["agent_a", "agent_b"]


def test_keys_hash_on_a_terminal_prompts_and_does_not_echo_the_key():
    """`keys hash` typed at a terminal: it waited without a word, and the terminal
    echoed the key as it was typed (on the screen, in a recorded session)."""
    import fcntl
    import pty
    import select
    import termios
    import time
    key = "condt_" + "k" * 43
    leader, follower = pty.openpty()

    def own_terminal():  # the pty as the controlling terminal, as a login shell has it
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    proc = subprocess.Popen([sys.executable, "-m", "conduit_sidecar", "keys", "hash"], stdin=follower,
                            stdout=follower, stderr=follower, start_new_session=True,
                            preexec_fn=own_terminal)
    os.close(follower)
    seen = b""

    def read_until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 20
        while text not in seen and time.monotonic() < deadline:
            if not select.select([leader], [], [], 0.1)[0]:
                continue
            try:
                seen += os.read(leader, 4096)
            except OSError:  # EIO: the process has gone
                break
    read_until(b": ")                          # a prompt, then the key typed
    os.write(leader, key.encode() + b"\n")
    read_until(hash_key(key).encode())
    assert proc.wait(20) == 0
    os.close(leader)
    assert hash_key(key).encode() in seen and key.encode() not in seen, seen


@pytest.mark.parametrize("field", ["--id", "--model", "--public-agent"])
def test_keys_new_refuses_an_entry_the_key_file_would_refuse(field):
    """`keys new --id condt_...` printed an entry holding a virtual key's prefix, which
    the key file then refused as a plaintext key; it is refused here, unquoted."""
    args = ["--id", "a"] if field != "--id" else []
    r = cli("keys", "new", *args, field, "condt_pastedKEYpastedKEY")
    assert r.returncode == 1 and "condt_" in r.stderr and r.stdout == "", r.stdout + r.stderr
    assert "pastedKEY" not in r.stderr


def test_check_config_names_file_field_and_problem(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '"}]}')
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n[limits]\nmax_connections = 0\n')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 1
    assert str(conf) in r.stderr and "$.limits.max_connections" in r.stderr and ">= 1" in r.stderr

    conf.write_text(f'keys_file = "{keys}"\n[providers.local]\nurl = "ws://127.0.0.1:9/?m={{model}}"\n'
                    'headers = { Authorization = "Bearer {secret}" }\n')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 1 and "needs secret_file or secret_env" in r.stderr
    assert r.stderr.startswith(f"invalid: {conf}: ") and "at `$.providers.local`" in r.stderr  # the file first

    keys.write_text('{"keys": [{"id": "a", "sha256": "condt_plaintext"}]}')
    conf.write_text(f'keys_file = "{keys}"\n')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 1 and "plaintext key" in r.stderr and "condt_plaintext" not in r.stderr

    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '", "max_connections": 0}]}')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 1 and str(keys) in r.stderr and "$.keys[0].max_connections" in r.stderr

    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '"}]}')
    conf.write_text(f'keys_file = "{keys}"\n[providers.openai]\nsecret_env = "X"\n'
                    'models = ["gpt-realtime*"]\n')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 0, r.stderr
    assert "openai: wss://api.openai.com/v1/realtime?model={model}" in r.stdout
    assert "Bearer ***" in r.stdout and "(1 keys)" in r.stdout


def test_listings_never_print_a_credential_typed_into_the_config(tmp_path):
    """A provider key written into `headers` or the URL itself (its query, or its user
    information, which goes out as Basic auth), rather than read through `{secret}`
    from a file or variable, was printed whole by check-config and providers,
    into a terminal, a CI log or a ticket."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n[providers.mine]\n'
                    'url = "wss://127.0.0.1:9/v1?model={model}&api_key=AIzaHUNTER1&mode=fast"\n'
                    'headers = { Authorization = "Bearer sk-HUNTER2", "xi-api-key" = "HUNTER3", '
                    '"OpenAI-Beta" = "realtime=v1" }\n'
                    '[providers.basic]\nurl = "wss://apiuser:HUNTER4@127.0.0.1:9/v1?model={model}"\n')
    env = {k: v for k, v in os.environ.items() if k != "CONDUIT_CONFIG"}
    for command in ("check-config", "providers"):
        r = cli(command, "--config", str(conf), env=env)
        assert r.returncode == 0, r.stderr
        assert "HUNTER" not in r.stdout + r.stderr
        assert "model={model}&api_key=***&mode=fast" in r.stdout     # what is not a credential stays
        assert "realtime=v1" in r.stdout and "***" in r.stdout
        assert "wss://***@127.0.0.1:9/v1?model={model}" in r.stdout  # Basic auth's user and password


@pytest.mark.parametrize("second, error", [
    ('{"id": "a", "sha256": "' + "1" * 64 + '"}', "duplicate key id 'a' - at `$.keys[1].id`"),
    ('{"id": "b", "sha256": "' + "0" * 64 + '"}', "duplicate sha256 - at `$.keys[1].sha256`"),
])
def test_check_config_refuses_two_entries_for_one_key(tmp_path, second, error):
    """One hash or one id, two entries: which one's policy a key gets would depend on
    their order in the file (the last one's), a disabled entry outdone by an enabled one."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '", "enabled": false}, ' + second + "]}")
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 1 and f"{keys}: {error}" in r.stderr, r.stdout + r.stderr


def test_check_config_warns_of_a_secret_it_cannot_read(tmp_path):
    """A missing secret file or unset variable passed check-config silently; then every
    session of that provider got 1011 "provider secret unavailable" (a provider with one
    deployment). A warning (the check may run where the Secret is not mounted), naming
    the source, not the secret."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '"}]}')
    secret = tmp_path / "openai"
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n[providers.openai]\nsecret_file = "{secret}"\n'
                    '[providers.local]\nurl = "ws://127.0.0.1:9/?m={model}"\n'
                    'headers = { Authorization = "Bearer {secret}" }\nsecret_env = "CONDUIT_TEST_UNSET"\n')
    env = {k: v for k, v in os.environ.items() if k != "CONDUIT_TEST_UNSET"}
    r = cli("check-config", "--config", str(conf), env=env)
    assert r.returncode == 0, r.stderr
    assert f"warning: provider 'openai': secret_file {secret}: No such file or directory" in r.stderr
    assert "warning: provider 'local': secret_env CONDUIT_TEST_UNSET is not set" in r.stderr
    # Read, but no header can carry it (a typographic quote pasted with the key): every
    # connect fails as a configuration fault, as for a missing one; check-config said nothing.
    secret.write_text("sk-hunter2\u2019\n", encoding="utf-8")
    r = cli("check-config", "--config", str(conf), env={**env, "CONDUIT_TEST_UNSET": "hunter3"})
    assert f"warning: provider 'openai': secret_file {secret}: a character outside ASCII" in r.stderr
    assert "hunter" not in r.stdout + r.stderr
    r = cli("check-config", "--config", str(conf), env={**env, "CONDUIT_TEST_UNSET": " "})
    assert "warning: provider 'local': secret_env CONDUIT_TEST_UNSET: empty" in r.stderr
    secret.write_text("sk-hunter2\n")
    r = cli("check-config", "--config", str(conf), env={**env, "CONDUIT_TEST_UNSET": "hunter3"})
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "hunter" not in r.stdout + r.stderr


def test_a_misspelt_variable_is_warned_of_at_check_config_and_at_start(tmp_path):
    """`CONDUIT_MAX_CONECTIONS=5` was ignored without a word: the sidecar ran with 1,000.
    Kubernetes' service variables, a secret's variable and names near none are not
    settings' typos."""
    from conftest import SidecarProcess, standard_keys

    provider = ('[providers.local]\nurl = "ws://127.0.0.1:9/?m={model}"\n'
                'headers = { Authorization = "Bearer {secret}" }\nsecret_env = "CONDUIT_LOCAL_KEY"\n')
    (tmp_path / "keys.json").write_text('{"keys": []}')
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{tmp_path / "keys.json"}"\n{provider}')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CONDUIT_")},
           "CONDUIT_MAX_CONECTIONS": "5", "CONDUIT_LOCAL_KEY": "k", "CONDUIT_LOCAL_KEYS": "k",
           "CONDUIT_TLS_SERVICE_HOST": "10.0.0.1", "CONDUIT_TLS_PORT": "tcp://10.0.0.1:443",
           "CONDUIT_TLS_PORT_443_TCP_ADDR": "10.0.0.1", "CONDUIT_APP_NAME": "shop"}
    r = cli("check-config", "--config", str(conf), env=env)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: $CONDUIT_LOCAL_KEYS sets nothing; did you mean $CONDUIT_LOCAL_KEY?",
                        "warning: $CONDUIT_MAX_CONECTIONS sets nothing; did you mean $CONDUIT_MAX_CONNECTIONS?"]
    sidecar = SidecarProcess(str(tmp_path), provider, standard_keys(), env=env).start()
    try:
        lines = [(line["event"], line["msg"]) for line in sidecar.log_lines() if line.get("level") == "warning"]
    finally:
        sidecar.stop()
    assert ("config_warning", "$CONDUIT_MAX_CONECTIONS sets nothing; did you mean $CONDUIT_MAX_CONNECTIONS?") in lines
    assert len([line for line in lines if line[0] == "config_warning"]) == 2, lines


def test_providers_lists_in_aligned_columns():
    """deepgram_agent, longer than the name column, pushed its own line's columns right."""
    r = cli("providers", env={k: v for k, v in os.environ.items() if k != "CONDUIT_CONFIG"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("deepgram_agent ") for line in lines)
    assert len({line.index("wss://") for line in lines if "wss://" in line}) == 1, r.stdout
    assert len({len(line) - len(line.lstrip()) for line in lines if line[:1] == " "}) == 1, r.stdout


def test_serve_refuses_a_bad_config_with_a_message(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('listen = "nonsense"\n')
    r = cli("serve", "--config", str(conf))
    assert r.returncode == 1 and "HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_serve_on_a_taken_port_exits_1_with_a_message(tmp_path):
    """A process supervisor restarts on a failure exit: 0 would read as a clean stop."""
    import socket
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("serve", "--listen", f"127.0.0.1:{port}", "--keys-file", str(keys),
                env={**os.environ, "CONDUIT_ADMIN_LISTEN": "127.0.0.1:0"})
    assert r.returncode == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr, r


@pytest.mark.parametrize("text, env, says", [
    ('listen = "127.0.0.1:99999"\n', {}, "$.listen"),                   # was bound modulo 65536
    ('admin_listen = "127.0.0.1:65536"\n', {}, "$.admin_listen"),
    ("limits = 5\n", {"CONDUIT_MAX_CONNECTIONS": "3"}, "$.limits"),      # was a TypeError
    ('[state]\nbackend = "redis"\nurl = "redis://:hunter2@127.0.0.1:notaport/0"\n', {}, "$.state.url"),
    ('[state]\nbackend = "redis"\nurl = "redis://:hunter2@127.0.0.1:70000/0"\n', {}, "$.state.url"),
    # Which provider, of several; and why its URL is not one (was "must be ws:// or wss://").
    ('[providers.a]\nurl = "ws://h/"\n[providers."my-b"]\nurl = "ws://h/"\nheaders = { X = 5 }\n', {},
     'Expected `str`, got `int` - at `$.providers."my-b".headers'),
    ('[providers.a]\nurl = "wss://h:99999/?model={model}&k=hunter2"\n', {}, "Port out of range 0-65535"),
    # A secret pasted where the port goes: urllib's message quotes it.
    ('[providers.a]\nurl = "wss://h:hunter2/x"\n', {}, "Port could not be cast to integer value - at"),
    ('[routes]\n"gpt*" = 5\n', {}, 'Expected `array`, got `int` - at `$.routes."gpt*"`'),
    # Past TOML's 64-bit integers: each session failed 1011 (the relay's sizes are uint64).
    ("[limits]\nmax_message_bytes = 18446744073709551616\n", {}, "at `$.limits.max_message_bytes`"),
    # TOML's inf: a traceback at start (the Redis lease in ms), or a timeout that never came.
    ('[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:1"\nlease_seconds = inf\n', {},
     "at `$.state.lease_seconds`"),
    ("[limits]\nhandshake_timeout_seconds = inf\n", {}, "at `$.limits.handshake_timeout_seconds`"),
    ("", {"CONDUIT_DRAIN_SECONDS": "inf"}, "at `$.limits.drain_seconds`"),
    # Polled without pause: a core spent on stat() and rechecking every live session.
    ("keys_poll_seconds = 1e-9\n", {}, "at `$.keys_poll_seconds`"),
    # Under two of loopback's 64 KiB segments: bulk relaying fell to 2,800 frames a second.
    ("[limits]\nsocket_buffer_bytes = 32768\n", {}, "socket_buffer_bytes is 0 (the kernel's sizing) or at least 65536"),
    # A browser's Origin has no path: with the slash no browser ever matched (403).
    ('allowed_origins = ["https://app.example.com/"]\n', {}, "at `$.allowed_origins[0]`"),
    # Nor capitals, nor the scheme's default port: a browser's Origin has neither (403).
    ('allowed_origins = ["HTTPS://App.example.com"]\n', {}, "at `$.allowed_origins[0]`"),
    ('allowed_origins = ["http://[::1]:3000", "https://app.example.com:443"]\n', {},
     "at `$.allowed_origins[1]`"),
    ('allowed_origins = ["https://app.example.com\\n"]\n', {}, "at `$.allowed_origins[0]`"),  # a "\n" escape
    # Gemini names its model in its setup message: every session would get 4004.
    ('[providers.gemini]\nurl = "ws://h/g/{model}?key={secret}"\nsecret_env = "K"\n', {},
     "its url cannot use {model} - at `$.providers.gemini.url`"),
])
def test_a_bad_config_is_named_never_a_traceback_or_a_secret(tmp_path, text, env, says):
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    for command in ("check-config", "serve"):
        r = cli(command, "--config", str(conf), env={**os.environ, **env})
        assert r.returncode == 1 and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "hunter2" not in r.stderr


_HIDDEN = "condt\\u005fpastedKEYpastedKEYpastedKEY"  # a key with its "_" JSON-escaped


@pytest.mark.parametrize("entry", [
    '"id": "' + _HIDDEN + '"',                                            # loaded: the id of every line
    '"budgets": [{"metric": "' + _HIDDEN + '", "limit": 1, "window": "day"}]',  # msgspec quotes it
    '"' + _HIDDEN + '": true',                                            # an unknown field's name
])
def test_a_key_file_holding_an_escaped_plaintext_key_is_refused_without_it(tmp_path, entry):
    """The plaintext check looked for `condt_` in the file's bytes: JSON that escapes a
    character of the key (`condt\\u005f...`) passed it. Such a key pasted as an id was
    loaded, and went into every log line and metric label of the key; pasted elsewhere,
    msgspec's error quoted it."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"sha256": "' + "0" * 64 + '", ' + entry + (
        "" if entry.startswith('"id"') else ', "id": "a"') + "}]}")
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n')
    r = cli("check-config", "--config", str(conf))
    assert r.returncode == 1 and "plaintext key" in r.stderr, r.stdout + r.stderr
    assert "pastedKEY" not in r.stdout + r.stderr


def test_providers_admin_that_is_no_url_is_named_not_a_traceback(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("")
    r = cli("providers", "--config", str(conf), "--admin", "localhost")   # no scheme, no port
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("conduit-sidecar: cannot read localhost/metrics: ")


def test_keys_new_names_the_flag_of_a_bad_value():
    r = cli("keys", "new", "--id", "a", "--expires", "tomorrow")
    assert r.returncode == 1 and r.stderr.startswith("conduit-sidecar: --expires: "), r.stderr
    r = cli("keys", "new", "--id", "a", "--max-connections", "0")
    assert r.returncode == 1 and r.stderr.startswith("conduit-sidecar: --max-connections: "), r.stderr
    r = cli("keys", "new", "--id", "a b")
    assert r.returncode == 1 and r.stderr.startswith("conduit-sidecar: --id: "), r.stderr


def test_check_config_warns_about_a_key_allowed_only_unconfigured_providers(tmp_path):
    """A typo in `allowed_providers` (or a provider not configured here) makes the key
    useless (every session 4003 or 4004), and check-config said it was fine."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"id": "typo", "sha256": "1" * 64, "allowed_providers": ["opneai"]},
        {"id": "some", "sha256": "2" * 64, "allowed_providers": ["openai", "azure"]},
        {"id": "fine", "sha256": "3" * 64, "allowed_providers": ["openai"]}]}))
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n[providers.openai]\nsecret_env = "X"\n')
    r = cli("check-config", "--config", str(conf), env={**os.environ, "X": "sk-set"})  # no secret warning
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "warning: key 'typo' allows provider 'opneai', which the config does not set up",
        "warning: key 'some' allows provider 'azure', which the config does not set up"]


def test_keys_new_expires_without_a_zone_is_utc(tmp_path):
    """The entry it prints must load: the key file refuses a time without a zone."""
    r = cli("keys", "new", "--id", "a", "--expires", "2027-01-01")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout.splitlines()[-1])
    assert entry["expires_at"] == "2027-01-01T00:00:00Z"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [entry]}))
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n')
    assert cli("check-config", "--config", str(conf)).returncode == 0


def test_usage_names_the_redis_host_never_its_url(tmp_path):
    """`usage` against a Redis that is down: where it is, not the URL and its password."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '"}]}')
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n[state]\nbackend = "redis"\n'
                    f'url = "redis://:p@ss@127.0.0.1:1/0?password=topsecret"\ntimeout_seconds = 1\n')
    r = cli("usage", "--config", str(conf))
    assert r.returncode == 1 and "127.0.0.1:1" in r.stderr, r.stderr
    assert "ss@" not in r.stderr and "topsecret" not in r.stderr and "Traceback" not in r.stderr


def test_a_redis_password_file_that_is_not_utf8_is_named_in_one_line(tmp_path):
    """A `[state] password_file` holding bytes that are not UTF-8 (a binary file, a
    Latin-1 editor): `serve` and `usage` ended in a UnicodeDecodeError traceback."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '"}]}')
    secret = tmp_path / "redis-password"
    secret.write_bytes("p\u00e4ssword-hunter2".encode("latin-1"))
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'
                    f'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:1/0"\npassword_file = "{secret}"\n')
    for command in ("serve", "usage"):
        r = cli(command, "--config", str(conf))
        assert r.returncode == 1 and r.stderr == f"conduit-sidecar: {secret}: not UTF-8 text\n", r.stderr
        assert "hunter2" not in r.stderr


def test_usage_given_a_virtual_key_for_an_id_never_prints_it(tmp_path):
    """`usage --key condt_...` (the key pasted where its id goes): the "no key" message
    printed it back, into a terminal's scrollback or a CI log. Now named by its sha256
    prefix, and by the id that holds it."""
    key = "condt_" + "pastedKEY" * 5
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "team-a", "sha256": "' + hash_key(key) + '"}]}')
    conf = tmp_path / "c.toml"
    conf.write_text(f'keys_file = "{keys}"\n[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:1/0"\n')
    r = cli("usage", "--config", str(conf), "--key", key)
    assert r.returncode == 1 and "pastedKEY" not in r.stdout + r.stderr, r.stderr
    assert hash_key(key)[:12] in r.stderr and "'team-a'" in r.stderr, r.stderr
    r = cli("usage", "--config", str(conf), "--key", key + "x")            # no such key
    assert r.returncode == 1 and "pastedKEY" not in r.stderr and str(keys) in r.stderr, r.stderr
    r = cli("usage", "--config", str(conf), "--key", "team-b")
    assert r.returncode == 1 and "no key 'team-b'" in r.stderr, r.stderr


def test_demo_runs_and_summarises():
    r = cli("demo", "--seconds", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "audio: 50 x 960 B frames" in out and "50 echoed back" in out
    assert "round trip: p50" in out and "close codes: session 1000, wrong key 4001" in out



@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "0.001", "1e9"])
def test_demo_refuses_seconds_it_cannot_stream(seconds):
    """Under one 20 ms frame the demo had no round trip to summarise: a
    StatisticsError traceback; 1e9 would build the audio in memory first."""
    r = cli("demo", "--seconds", seconds)
    assert r.returncode == 2 and "--seconds" in r.stderr and "Traceback" not in r.stderr, r.stderr

def test_the_demo_runs_as_the_image_runs_the_sidecar():
    """The image sets PYTHONOPTIMIZE=2 (no docstrings, no asserts: about 1 MiB less RSS,
    docs/benchmarks.md): nothing of the sidecar may need them. And PYTHONMALLOC=malloc."""
    r = cli("demo", "--seconds", "1", env={**os.environ, "PYTHONOPTIMIZE": "2", "PYTHONMALLOC": "malloc"})
    assert r.returncode == 0, r.stderr
    assert "50 echoed back" in r.stdout and "close codes: session 1000, wrong key 4001" in r.stdout


def test_help_keeps_its_description_as_the_image_runs_it():
    """-OO (the image's PYTHONOPTIMIZE=2) strips docstrings: a description taken from
    the module's docstring vanished from --help."""
    r = subprocess.run([sys.executable, "-OO", "-m", "conduit_sidecar", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "The `conduit-sidecar` command." in r.stdout


def test_serve_leaves_what_it_never_uses_unloaded():
    """Modules other packages import and `serve` never uses (websockets' for its
    version, prometheus-client's for a server of its own) stay stand-ins
    (conduit_sidecar/deferred.py), at import and through a session: the demo runs one,
    and the metrics are then exposed as /metrics does."""
    code = ("import atexit, runpy, sys; from conduit_sidecar import deferred; "
            "from prometheus_client.exposition import generate_latest; "
            "kept = lambda: [n for n in deferred.UNUSED if type(sys.modules[n]).__name__ == '_StandIn'] "
            "+ sorted(m for m in ('zipfile', 'csv', '_bz2', '_lzma', 'html.entities') if m in sys.modules); "
            "import conduit_sidecar.cli, conduit_sidecar.server; print(*kept()); "
            "atexit.register(lambda: generate_latest() and print(*kept())); "
            "sys.argv = ['conduit-sidecar', 'demo', '--seconds', '1']; "
            "runpy.run_module('conduit_sidecar', run_name='__main__')")
    from conduit_sidecar.deferred import UNUSED
    run = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True, timeout=60)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[0].split() == lines[-1].split() == list(UNUSED), run.stdout + run.stderr


@pytest.mark.parametrize("use", [
    "importlib.metadata.version('websockets')",
    "__import__('importlib.metadata', fromlist=['version']).version('websockets')",
    "importlib.import_module('importlib.metadata').version('websockets')",
    "__import__('importlib.metadata._meta') and importlib.metadata.version('websockets')",
])
def test_a_deferred_module_is_itself_at_its_first_use(use):
    """Whichever way it is first read (an attribute, `from ... import`, a submodule's
    import), the stand-in gives way to the module, found by `find_spec` before."""
    code = ("import importlib, importlib.util, sys, types, conduit_sidecar.server, websockets.version; "
            "assert importlib.util.find_spec('importlib.metadata').origin.endswith('__init__.py'); "
            "print(type(sys.modules['importlib.metadata']).__name__ == '_StandIn', "
            f"{use} == websockets.version.version, "
            "type(sys.modules['importlib.metadata']) is types.ModuleType, "
            "importlib.metadata is sys.modules['importlib.metadata'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.split() == ["True"] * 4, run.stdout + run.stderr


def test_a_module_its_package_imports_is_not_deferred():
    """find_spec imports a submodule's package first, which may import the submodule:
    a stand-in put in its place then made its first use run the module a second time
    (two `AbstractEventLoop` classes)."""
    code = ("import sys; from conduit_sidecar import deferred; deferred.defer('asyncio.events'); "
            "import asyncio; print(sys.modules['asyncio.events'].AbstractEventLoop is asyncio.AbstractEventLoop)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.split() == ["True"], run.stdout + run.stderr


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("args", [["providers"], ["keys", "new", "--id", "x"], ["--help"],
                                  ["inject", "-f", "k8s/base/deployment.yaml"]])
def test_output_into_a_closed_pipe_is_no_traceback(args, buffered):
    """`conduit-sidecar providers | head -1`: the reader gone, the next write (or the
    flush at exit) raised BrokenPipeError, printed as a traceback or "Exception ignored".
    The pipe's read end is closed before the command starts, so every write hits it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "conduit_sidecar", *args], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=60, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        os.close(write)
    assert r.stderr == "", r
    # (argparse's --help ignores a failed write itself, and exits 0 when nothing is left)
    assert r.returncode == 1 or (args == ["--help"] and not buffered and r.returncode == 0), r


@pytest.mark.parametrize("provider,events,metered", [
    ("gemini", "setupComplete, serverContent, serverContent", "'input': 4.0"),
    ("deepgram", "Results, Results, Metadata", "{'audio': 1.0}"),
    ("deepgram_agent", "Welcome, SettingsApplied, UserStartedSpeaking, ConversationText, History, "
     "ConversationText, History, AgentThinking, AgentStartedSpeaking, audio, AgentAudioDone", "nothing"),
    ("assemblyai", "Begin, Turn, Termination", "{'audio': 1.0}"),
    ("elevenlabs", "conversation_initiation_metadata, agent_response", "nothing"),
    ("azure", "session.created, response.output_audio.delta, response.done", "'input_audio': 10.0"),
])
def test_demo_of_each_provider_shape(provider, events, metered):
    r = cli("demo", "--provider", provider)
    assert r.returncode == 0, r.stderr
    assert f"provider events: {events}\n" in r.stdout and metered in r.stdout
    assert "close code: 1000" in r.stdout
