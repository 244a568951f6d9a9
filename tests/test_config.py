import pytest
import pytest_twisted
import treq

from loom.config import Config, load_config
from loom.errors import ConfigError
from tests.helpers import TWISTD, child_environment, spawn


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_listen_on_loopback_3060_with_data_in_dot_data():
    """With nothing configured Loom listens on 127.0.0.1:3060 and stores in ./data."""
    config = load_config().config
    assert config == Config()
    assert config.listen == ("tcp:3060:interface=127.0.0.1",)
    assert config.data_dir == "./data"
    assert config.tokens == ()
    assert config.fsync == "interval" and config.fsync_interval == 1.0


def test_original_service_keys_are_accepted(tmp_path):
    """A config file of the original service works unchanged."""
    path = write(tmp_path, "old.yml", (
        "host: 0.0.0.0\nport: 4000\nstorageDataDir: /tmp/loom-data\n"
        "storageCompress: false\nstorageTailTimeout: 30000\ntokens:\n  - token1\n  - token2\n"
    ))
    loaded = load_config([path])
    assert loaded.config.listen == ("tcp:4000:interface=0.0.0.0",)
    assert loaded.config.data_dir == "/tmp/loom-data"
    assert [t.secret for t in loaded.config.tokens] == ["token1", "token2"]
    assert all(t.scopes == {"read", "write", "replace", "spy", "admin"}
               for t in loaded.config.tokens)
    assert any("storageTailTimeout" in w for w in loaded.warnings)


def test_precedence_is_defaults_files_env_cli(tmp_path):
    """Later files beat earlier ones, environment beats files, command line beats all."""
    first = write(tmp_path, "a.yml", "port: 4001\nfsync: never\nstorageDataDir: /a\n")
    second = write(tmp_path, "b.yml", "port: 4002\n")
    assert load_config([first, second]).config.listen == ("tcp:4002:interface=127.0.0.1",)
    env = {"LOOM_PORT": "4003", "LOOM_FSYNC": "always"}
    config = load_config([first, second], env).config
    assert config.listen == ("tcp:4003:interface=127.0.0.1",)
    assert config.fsync == "always"
    assert config.data_dir == "/a"
    config = load_config([first, second], env, {"port": "4004"}).config
    assert config.listen == ("tcp:4004:interface=127.0.0.1",)


def test_host_and_port_fill_each_other_in_across_levels(tmp_path):
    """A host from a file and a port from the command line combine."""
    path = write(tmp_path, "a.yml", "host: 10.1.2.3\n")
    assert load_config([path], {}, {"port": "5000"}).config.listen == (
        "tcp:5000:interface=10.1.2.3",
    )


def test_listen_overrides_host_and_port_from_lower_levels(tmp_path):
    """An explicit endpoint list at a higher level wins over host/port below it."""
    path = write(tmp_path, "a.yml", "port: 4001\n")
    config = load_config([path], {"LOOM_LISTEN": "unix:/tmp/l.sock, tcp:5001"}).config
    assert config.listen == ("unix:/tmp/l.sock", "tcp:5001")
    # ...and a port on the command line wins over a listen in a file.
    path = write(tmp_path, "b.yml", "listen: [tcp:6000]\n")
    assert load_config([path], {}, {"port": "6001"}).config.listen == (
        "tcp:6001:interface=127.0.0.1",
    )


def test_listen_and_port_in_one_source_is_refused(tmp_path):
    """Giving both listen and port in one file is ambiguous: a clear error."""
    path = write(tmp_path, "a.yml", "port: 1\nlisten: tcp:2\n")
    with pytest.raises(ConfigError, match="either listen or host/port"):
        load_config([path])


def test_ipv6_host_is_escaped_in_the_endpoint():
    """An IPv6 interface becomes a valid endpoint string."""
    assert load_config(cli={"host": "::1"}).config.listen == ("tcp:3060:interface=\\:\\:1",)


@pytest.mark.parametrize(
    "text, message",
    [
        ("prot: 3060\n", "unknown key 'prot'"),
        ("port: 70000\n", "port: 70000 is out of range"),
        ("port: abc\n", "port: expected a whole number"),
        ("port: true\n", "port: expected a whole number"),
        ("fsync: sometimes\n", "fsync: expected one of always, interval, never"),
        ("fsyncInterval: 0\n", "fsyncInterval: must be greater than zero"),
        ("tokens: [ok, 'has space']\n", "token #2 must be"),
        ("tokens: secret\n", "expected a list of tokens"),
        ("maxMetadataBytes: 1MiB\n", "out of range"),
        ("- a\n- b\n", "expected a mapping"),
        ("port: [\n", "invalid YAML at line"),
        ("x: !!python/object:os.system ls\n", "invalid YAML"),
    ],
)
def test_bad_files_stop_with_one_line_naming_the_problem(tmp_path, text, message):
    """Unknown keys, bad values and unsafe YAML are one-line errors naming file and key."""
    path = write(tmp_path, "bad.yml", text)
    with pytest.raises(ConfigError) as caught:
        load_config([path])
    assert message in str(caught.value)
    assert path in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unreadable_file_is_a_clear_error(tmp_path):
    """A missing config file is named in the error."""
    missing = str(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="missing.yml: cannot read it"):
        load_config([missing])


def test_bad_environment_value_names_the_variable():
    """A bad LOOM_* value names the variable."""
    with pytest.raises(ConfigError, match="environment: LOOM_PORT"):
        load_config([], {"LOOM_PORT": "http"})


def test_unknown_loom_variables_warn_but_client_ones_are_quiet():
    """Unknown LOOM_* variables are reported as warnings; LOOM_TOKEN belongs to the CLI."""
    loaded = load_config([], {"LOOM_PROT": "1", "LOOM_TOKEN": "t", "HOME": "/"})
    assert loaded.warnings == ("ignoring unknown environment variable LOOM_PROT",)


def test_durations_and_sizes_take_units(tmp_path):
    """Durations and sizes accept human units."""
    path = write(tmp_path, "a.yml", (
        "producerIdleTimeout: 2h\nidleTimeout: 90s\nfsyncInterval: 250ms\n"
        "maxMetadataBytes: 12KiB\n"
    ))
    config = load_config([path]).config
    assert config.producer_idle_timeout == 7200
    assert config.idle_timeout == 90
    assert config.fsync_interval == 0.25
    assert config.max_metadata_bytes == 12288
    assert load_config([], {"LOOM_PRODUCER_IDLE_TIMEOUT": "0"}).config.producer_idle_timeout is None


def test_tokens_from_environment_are_comma_separated():
    """LOOM_TOKENS holds several tokens separated by commas."""
    tokens = load_config([], {"LOOM_TOKENS": "a, b,c"}).config.tokens
    assert [t.secret for t in tokens] == ["a", "b", "c"]


def test_scoped_tokens_and_bare_tokens_side_by_side(tmp_path):
    """The original list form keeps full access; mappings limit a token to its scopes."""
    path = write(tmp_path, "a.yml", (
        "tokens:\n  - legacy-token\n  - {token: ci-writer, scopes: [write]}\n"
        "  - {token: dashboard, scopes: [read, spy]}\n  - {token: ops, scopes: [admin]}\n"
    ))
    tokens = {t.secret: t.scopes for t in load_config([path]).config.tokens}
    assert tokens == {
        "legacy-token": {"read", "write", "replace", "spy", "admin"},
        "ci-writer": {"write"},
        "dashboard": {"read", "spy"},
        "ops": {"admin"},
    }
    assert "legacy-token" not in repr(load_config([path]).config)  # never printed


@pytest.mark.parametrize(
    "text, message",
    [
        ("tokens: [{token: a, scopes: [fly]}]", "scopes must be a list drawn from"),
        ("tokens: [{token: a, scopes: []}]", "scopes must be a list drawn from"),
        ("tokens: [{token: a, scope: [read]}]", "only token and scopes are allowed"),
        ("tokens: [{scopes: [read]}]", "token #1 must be"),
        ("tokens: [a, a]", "the same token is listed twice"),
        ("retention: forever", "retention: expected a duration"),
        ("resumeWindow: -1", "resumeWindow: expected a duration"),
    ],
)
def test_bad_tokens_and_new_settings_are_refused(tmp_path, text, message):
    """Unknown scopes, missing tokens, duplicates and bad durations are one-line errors."""
    path = write(tmp_path, "bad.yml", text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config([path])


@pytest.mark.parametrize(
    "text",
    [
        "tokens: [{sekrit-one: [write]}]",  # the token written as a key
        "tokens: [sekrit-one, 'sekrit two']",
        "tokens: [sekrit-one, sekrit-one]",
        "tokens: [{token: sekrit-one, scopes: [fly]}]",
        "tokens: [ok, *sekrit-one]",  # an unquoted token starting with * is an alias
        "tokens: [ok, !sekrit-one x]",  # ... and one starting with ! a tag
        "tokens: [ok, &sekrit-one]",
        "tokens:\n  - sekrit-one\n  - [sekrit-two",
        "tokens: [\"sekrit-\\q\"]",
    ],
)
def test_config_errors_never_repeat_a_token(tmp_path, text):
    """Config errors reach the log (start-up, SIGHUP): none may carry a token's text."""
    path = write(tmp_path, "bad.yml", text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config([path])
    assert "sekrit" not in str(caught.value)
    assert path in str(caught.value)


def test_retention_and_resume_window(tmp_path):
    """retention (default: keep forever) and resumeWindow (default 30 s) take durations."""
    assert load_config().config.retention is None
    assert load_config().config.resume_window == 30
    path = write(tmp_path, "a.yml", "retention: 30d\nresumeWindow: 0\n")
    config = load_config([path]).config
    assert config.retention == 30 * 86400 and config.resume_window is None


# The keys of the original service's defaults.yaml (it stored streams in RethinkDB).
ORIGINAL_DEFAULTS = """\
host: 'localhost'
port: 3060
dbHost: 'localhost'
dbPort: 28015
dbName: "logs"
storageMetaTable: "meta"
storageLogsTable: "logs"
# storageDataDir: "data"
# storageTailTimeout: 30s
# storageCompress: true
tokens:
  - sekrit-tik
  - sekrit-tok
"""


def test_the_original_defaults_file_loads_with_one_warning(tmp_path):
    """The original's defaults.yaml, RethinkDB keys and all, loads; one warning names the
    keys that do nothing."""
    loaded = load_config([write(tmp_path, "defaults.yaml", ORIGINAL_DEFAULTS)])
    assert loaded.config.listen == ("tcp:3060:interface=localhost",)
    assert [t.secret for t in loaded.config.tokens] == ["sekrit-tik", "sekrit-tok"]
    assert loaded.warnings == (
        "these settings of the original service have no effect in Loom: "
        "dbHost, dbName, dbPort, storageLogsTable, storageMetaTable",
    )


def test_original_keys_are_not_settings_elsewhere(tmp_path):
    """The original's RethinkDB keys are accepted in files only; a typo is still an error."""
    with pytest.raises(ConfigError, match="unknown key 'dbHots'"):
        load_config([write(tmp_path, "a.yml", "dbHots: x\n")])
    assert load_config([], {"LOOM_DB_HOST": "x"}).warnings == (
        "ignoring unknown environment variable LOOM_DB_HOST",)


@pytest_twisted.ensureDeferred
async def test_twistd_starts_on_the_original_defaults_file(tmp_path):
    """`twistd loom -c defaults.yaml` with the original's file starts, warns once, serves."""
    path = write(tmp_path, "defaults.yaml", ORIGINAL_DEFAULTS)
    argv = TWISTD + ["--nodaemon", "--pidfile=", "loom", "-c", path,
                     "--data-dir", str(tmp_path / "data")]
    # Port 0 instead of 3060 (which may be taken here); host 'localhost' comes from the file.
    process = spawn(argv, env=child_environment(LOOM_PORT="0"), cwd=str(tmp_path))
    try:
        match = await process.protocol.wait_for_output(r"Loom ready: .* listening on .*:(\d+)")
        url = f"http://localhost:{match.group(1)}"
        response = await treq.get(url + "/streams", headers={"Authorization": "Bearer sekrit-tok"})
        assert response.code == 200
        await response.content()
        assert (await treq.get(url + "/streams")).code == 401
        warnings = [line for line in process.text().splitlines() if "] config: " in line]
        assert len(warnings) == 1 and "dbHost, dbName, dbPort" in warnings[0], warnings
    finally:
        process.signal("TERM")
        await process.wait()


def test_direct_send_is_on_by_default_and_can_be_switched_off(tmp_path):
    """directSend (LOOM_DIRECT_SEND) takes true or false; anything else is refused."""
    assert load_config([], {}).config.direct_send is True
    assert load_config([write(tmp_path, "a.yaml", "directSend: false\n")], {}).config \
        .direct_send is False
    assert load_config([], {"LOOM_DIRECT_SEND": "off"}).config.direct_send is False
    with pytest.raises(ConfigError, match="LOOM_DIRECT_SEND"):
        load_config([], {"LOOM_DIRECT_SEND": "sometimes"})
