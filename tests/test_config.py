import os
import re
import socket
import tomllib

import pytest
import requests

import launcher
from conftest import ROOT, process_env, run_cli
import pausepoint
from pausepoint import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_every_setting_is_documented_in_the_example_config_with_its_default():
    with open(os.path.join(ROOT, "config.example.toml"), "rb") as f:
        example = dict(pausepoint.flatten(tomllib.load(f)))
    for setting in pausepoint.SETTINGS:
        assert setting.key in example, f"{setting.key} is missing from config.example.toml"
        assert example[setting.key] == setting.default, f"{setting.key}'s example differs from its default"


def test_the_example_config_loads_as_is():
    assert load_config(os.path.join(ROOT, "config.example.toml"), environ={}) == load_config(environ={})


def test_defaults_serve_on_localhost_8080_with_a_local_database():
    config = load_config(environ={})
    assert (config["server.host"], config["server.port"], config["database.path"]) == ("127.0.0.1", 8080, "pausepoint.db")
    assert config["registration.open"] is True
    assert pausepoint.base_url(config) == "http://127.0.0.1:8080"


def test_file_then_environment_then_flags_overlay_the_defaults(tmp_path):
    path = write(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"\nbase_url = "https://pp.example.org/"\n'
                           '[plans.team]\nmonthly_pauses = 5000\n')
    config = load_config(path, environ={"PAUSEPOINT_SERVER_PORT": "9100", "PAUSEPOINT_REGISTRATION_OPEN": "false"},
                         overrides={"server.host": "127.0.0.2", "server.port": None})
    assert config["server.port"] == 9100
    assert config["server.host"] == "127.0.0.2"
    assert config["registration.open"] is False
    assert pausepoint.plans(config) == {"free": 100, "team": 5000}
    assert pausepoint.base_url(config) == "https://pp.example.org"


@pytest.mark.parametrize("text, environ, said", [
    ("[server]\nprot = 1\n", {}, "server.prot"),
    ("[server]\nport = 'eighty'\n", {}, "server.port must be a whole number"),
    ("[server]\nport = 70000\n", {}, "server.port"),
    ("[server]\nbase_url = 'ftp://x'\n", {}, "server.base_url"),
    ("[server]\nbase_url = 'https://example.org/pausepoint'\n", {},
     "server.base_url must be empty or an http:// or https:// address with no path"),
    ("", {"PAUSEPOINT_SERVER_BASE_URL": "https://example.org/?x=1"}, "server.base_url must be empty"),
    ("[server]\nbase_url = 'HTTPS://example.org'\n", {}, "server.base_url must begin http:// or https:// in lower case"),
    # Each would send people links that do not open, or that read like someone else's site.
    ("", {"PAUSEPOINT_SERVER_BASE_URL": "https://ops@example.org"}, "server.base_url must be a host name or address"),
    ("", {"PAUSEPOINT_SERVER_BASE_URL": "https://example.org:80800"}, "server.base_url must be a host name or address"),
    ("", {"PAUSEPOINT_SERVER_BASE_URL": "https://example.org:https"}, "server.base_url must be a host name or address"),
    ("", {"PAUSEPOINT_SERVER_BASE_URL": "https://:8443"}, "server.base_url must be a host name or address"),
    ("[plans.team]\nmonthly_pauses = -1\n", {}, "plans.team.monthly_pauses"),
    ("", {"PAUSEPOINT_SERVER_THREADS": "many"}, "server.threads must be a whole number"),
    ("", {"PAUSEPOINT_SERVER_THREADS": "12.5"}, "server.threads must be a whole number"),
    ("", {"PAUSEPOINT_SERVER_COLOUR": "red"}, "PAUSEPOINT_SERVER_COLOUR"),
    ("", {"PAUSEPOINT_RATELIMIT_ENABLED": "maybe"}, "ratelimit.enabled"),
    ("[server]\nhost = '0.0.0.0:8080'\n", {}, "server.host must be an address or a host name, without a port"),
    ("", {"PAUSEPOINT_SERVER_HOST": "http://localhost"}, "server.host must be an address or a host name"),
    ("[smtp]\nca_file = '/nonexistent/ca.pem'\n", {}, "smtp.ca_file cannot be read: No such file or directory"),
    (f"[smtp]\nca_file = '{os.path.join(ROOT, 'README.md')}'\n", {}, "smtp.ca_file holds no PEM certificate"),
    ("", {"PAUSEPOINT_TWILIO_FROM_NUMBER": "5550100"}, "twilio.from_number must be empty, a phone number in E.164"),
    ("[twilio]\nfrom_number = 'whatsapp:+15550100'\n", {}, "twilio.from_number must be empty, a phone number"),
    ("", {"PAUSEPOINT_TWILIO_ACCOUNT_SID": "my-account"}, "twilio.account_sid must be empty or Twilio's account SID"),
    ("[twilio]\nmessaging_service_sid = 'MG123'\n", {}, "twilio.messaging_service_sid must be empty or a Twilio"),
    ("", {"PAUSEPOINT_SMTP_FROM_ADDRESS": "notanemail"}, "smtp.from_address must be empty or one email address"),
    ("[smtp]\nfrom_address = 'a@example.org, b@example.org'\n", {}, "smtp.from_address must be empty or one email"),
    ("", {"PAUSEPOINT_SMTP_FROM_ADDRESS": "PausePoint <approvals@bücher.de>"},
     "smtp.from_address must name its domain as DNS does, in ASCII: a name with other letters in its xn-- form"),
    ("", {"PAUSEPOINT_TWILIO_FROM_NUMBER": "15550100"}, "twilio.from_number must be empty, a phone number in E.164"),
    ("", {"PAUSEPOINT_TWILIO_FROM_NUMBER": "+1555O100"}, "twilio.from_number must be empty, a phone number in E.164"),
    (f"[twilio]\naccount_sid = 'AC{'0' * 32}'\n", {},
     "the Twilio settings are incomplete: with twilio.account_sid set, the sms and whatsapp channels also need"
     " twilio.auth_token and either twilio.from_number or twilio.messaging_service_sid"),
    ("", {"PAUSEPOINT_TWILIO_AUTH_TOKEN": "secret", "PAUSEPOINT_TWILIO_FROM_NUMBER": "+15550100"},
     "with twilio.auth_token and twilio.from_number set, the sms and whatsapp channels also need twilio.account_sid"),
    # Past these the hourly pruning job fails on every run, a date before year 1 or a number SQLite cannot hold.
    ("[retention]\ntest_days = 1000000\n", {}, "retention.test_days must be between 1 and 36500 (a hundred years)"),
    ("", {"PAUSEPOINT_RETENTION_DELIVERY_LOG_DAYS": "999999999"}, "retention.delivery_log_days must be between 4"),
    ("", {"PAUSEPOINT_RETENTION_TEST_PAUSES_KEPT": str(2 ** 64)}, "retention.test_pauses_kept must be between 1 and"),
    # TOML may spell a NUL character, which no file name, host or address holds.
    ('[smtp]\nca_file = "ca\\u0000.pem"\n', {}, "smtp.ca_file must not contain a NUL character"),
    ('[database]\npath = "pause\\u0000point.db"\n', {}, "database.path must not contain a NUL character"),
    ('[smtp]\nhost = "mail\\u0000.example.org"\n', {}, "smtp.host must not contain a NUL character"),
])
def test_a_bad_setting_stops_start_up_with_one_sentence_naming_the_key(tmp_path, text, environ, said):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), environ=environ)
    assert said in str(error.value)
    assert "\n" not in str(error.value)


def test_a_config_file_saved_by_a_windows_editor_is_read_or_refused_in_one_sentence(tmp_path):
    """Notepad may add a byte order mark, an older editor save Windows-1252, and Windows
    PowerShell's `>` writes UTF-16: the first is read as meant, the others named as not UTF-8."""
    path = tmp_path / "config.toml"
    path.write_bytes("\ufeff[server]\nport = 8081\n".encode("utf-8"))
    assert load_config(str(path), environ={})["server.port"] == 8081
    for text, encoding in (('[smtp]\nfrom_address = "Café <a@example.org>"\n', "cp1252"),
                           ("[server]\nport = 8081\n", "utf-16")):
        path.write_bytes(text.encode(encoding))
        with pytest.raises(ConfigError) as error:
            load_config(str(path), environ={})
        assert str(error.value).startswith(f"config file {path} is not UTF-8 text: save it as UTF-8"), error.value


def test_a_misspelt_setting_is_refused_naming_the_one_meant(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "[webhooks]\nallow_privat = true\n"), environ={})
    assert str(error.value) == "unknown setting: webhooks.allow_privat (did you mean webhooks.allow_private?)"
    with pytest.raises(ConfigError) as error:
        load_config(environ={"PAUSEPOINT_WEBHOOK_ALLOW_PRIVATE": "true"})
    assert str(error.value) == ("unknown setting: environment variable PAUSEPOINT_WEBHOOK_ALLOW_PRIVATE names no"
                                " setting (did you mean PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE?)")
    with pytest.raises(ConfigError) as error:      # nothing near it: nothing suggested
        load_config(write(tmp_path, "[server]\nfoo = 1\n"), environ={})
    assert str(error.value) == "unknown setting: server.foo"


def test_twilio_and_smtp_settings_of_every_accepted_form_start():
    """A Twilio-compatible provider may name its account by UUID; a From address may carry a name."""
    for twilio in ({"twilio.from_number": "+15550100"}, {"twilio.messaging_service_sid": "MG" + "a1" * 16},
                   {"twilio.from_number": "12345"}, *({"twilio.from_number": sender_id}      # a short code, sender IDs
                                                       for sender_id in ("PausePoint", "AT&T", "Acme-Corp", "B+Q"))):
        for account_sid in ("AC" + "0f" * 16, "3f2b8c1e-9d4a-4e7b-8a1c-2b3d4e5f6a7b"):
            load_config(environ={}, overrides={"twilio.account_sid": account_sid, "twilio.auth_token": "t", **twilio})
    for sender in ("approvals@example.org", "PausePoint <approvals@example.org>", '"Ops, Team" <ops@example.org>',
                   "Bücher GmbH <approvals@xn--bcher-kva.de>"):
        assert load_config(environ={"PAUSEPOINT_SMTP_FROM_ADDRESS": sender})["smtp.from_address"] == sender


def test_the_agent_side_tools_variables_are_no_misspelt_settings():
    """An operator who runs an agent's tools where the server runs has their variables set."""
    read = set()
    for folder in ("client", "examples"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith((".py", ".md")):
                with open(os.path.join(ROOT, folder, name), encoding="utf-8") as f:
                    read |= set(re.findall(r"PAUSEPOINT_[A-Z0-9_]*[A-Z0-9]", f.read()))
    assert read - set(pausepoint.AGENT_SIDE_VARIABLES) == set()
    assert {"PAUSEPOINT_URL", "PAUSEPOINT_HOOK_WAIT", "PAUSEPOINT_MCP_WAIT"} <= read       # the search finds them
    assert load_config(environ={name: "x" for name in pausepoint.AGENT_SIDE_VARIABLES}) == load_config(environ={})
    with pytest.raises(ConfigError, match="PAUSEPOINT_URLS names no setting"):
        load_config(environ={"PAUSEPOINT_URLS": "x"})


def test_a_trusted_proxy_is_kept_as_a_dual_stack_listener_writes_an_ipv4_one():
    # Waitress believes the proxy's headers only when the peer's address, as the socket wrote
    # it, is server.trusted_proxy's text: a dual-stack listener writes an IPv4 proxy so.
    with socket.socket(socket.AF_INET6) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::ffff:127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(("127.0.0.1", listener.getsockname()[1])):
            peer, (written, *_) = listener.accept()
            peer.close()
    assert written == "::ffff:127.0.0.1"
    for spelling in ("::ffff:127.0.0.1", "::FFFF:7f00:1", "0:0:0:0:0:ffff:127.0.0.1"):    # Python writes ::ffff:7f00:1
        assert load_config(environ={}, overrides={"server.trusted_proxy": spelling})["server.trusted_proxy"] == written


def test_the_server_refuses_to_start_on_a_bad_setting(tmp_path):
    path = write(tmp_path, "[server]\nthreads = 2\n")
    result = launcher.run(["--config", path], tmp_path, process_env())     # `python pausepoint.py --config path`
    assert result.returncode == 2
    assert re.search(r"server\.threads must be between", result.stderr)


def test_a_config_file_in_the_working_directory_is_read_by_the_command_line_only(tmp_path, monkeypatch, spawn_server):
    write(tmp_path, "[registration]\nopen = false\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={})["registration.open"] is True
    server = spawn_server()                     # runs in tmp_path, beside config.toml
    refused = requests.post(f"{server.url}/v1/auth/register",
                            json={"email": "a@example.com", "name": "A", "password": "password123"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "registration_closed"


def test_a_hyphenated_channel_is_overridden_by_its_environment_variable(tmp_path):
    path = write(tmp_path, '[channels.team-chat]\nurl = "ntfy://ntfy.example.org/team"\n'
                           '[plans.big-team]\nmonthly_pauses = 5000\n')
    config = load_config(path, environ={"PAUSEPOINT_CHANNELS_TEAM_CHAT_URL": "ntfy://x.example/y",
                                        "PAUSEPOINT_PLANS_BIG_TEAM_MONTHLY_PAUSES": "9000"})
    assert config["channels.team-chat.url"] == "ntfy://x.example/y" and "channels.team_chat.url" not in config
    assert set(pausepoint.channels(config)) == {*pausepoint.BUILT_IN_CHANNELS, "team-chat"}
    assert pausepoint.plans(config) == {"free": 100, "big-team": 9000}
    alone = load_config(environ={"PAUSEPOINT_CHANNELS_TEAM_CHAT_URL": "ntfy://x.example/y"})     # no file to match
    assert set(pausepoint.channels(alone)) == {*pausepoint.BUILT_IN_CHANNELS, "team_chat"}


def test_a_variable_that_could_name_two_channels_stops_start_up_naming_both(tmp_path):
    path = write(tmp_path, '[channels.team-chat]\nurl = "ntfy://ntfy.example.org/a"\n'
                           '[channels.team_chat]\nurl = "ntfy://ntfy.example.org/b"\n')
    assert set(pausepoint.channels(load_config(path, environ={}))) >= {"team-chat", "team_chat"}
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={"PAUSEPOINT_CHANNELS_TEAM_CHAT_URL": "ntfy://x.example/y"})
    assert str(error.value) == (f"$PAUSEPOINT_CHANNELS_TEAM_CHAT_URL could set channels.team-chat.url or"
                                f" channels.team_chat.url in {path}: rename one of them")


def test_who_may_use_a_push_target_can_be_set_from_the_environment_as_a_comma_separated_list(tmp_path):
    config = load_config(environ={"PAUSEPOINT_CHANNELS_OPS_URL": "ntfy://ntfy.example.org/ops",
                                  "PAUSEPOINT_CHANNELS_OPS_DEVELOPERS": "ada@example.com, bo@example.com,",
                                  "PAUSEPOINT_CHANNELS_ALL_URL": "ntfy://ntfy.example.org/all",
                                  "PAUSEPOINT_CHANNELS_ALL_DEVELOPERS": "*"})
    assert config["channels.ops.developers"] == ["ada@example.com", "bo@example.com"]
    assert config["channels.all.developers"] == ["*"]
    # As the url's variable does, it sets the list of the file's [channels.team-chat].
    path = write(tmp_path, '[channels.team-chat]\nurl = "ntfy://ntfy.example.org/team"\n')
    config = load_config(path, environ={"PAUSEPOINT_CHANNELS_TEAM_CHAT_DEVELOPERS": "ada@example.com"})
    assert config["channels.team-chat.developers"] == ["ada@example.com"]


@pytest.mark.parametrize("text, environ, said", [
    ("[channels.ops]\nurl = 'ntfy://ntfy.example.org/ops'\ndevelopers = 'ada@example.com'\n", {},
     "channels.ops.developers must be a list"),
    ("[channels.ops]\nurl = 'ntfy://ntfy.example.org/ops'\ndevelopers = ['ada']\n", {},
     "channels.ops.developers must be a list of developers' account emails"),
    # No account's email ends in a newline (registration strips it): such an entry would let no one in.
    ('[channels.ops]\nurl = "ntfy://ntfy.example.org/ops"\ndevelopers = ["ada@example.com\\n"]\n', {},
     "channels.ops.developers must be a list of developers' account emails"),
    ("[channels.ops]\nurl = 'ntfy://ntfy.example.org/ops'\n", {"PAUSEPOINT_CHANNELS_OPS_DEVELOPERS": "*, ada@example.com"},
     'channels.ops.developers must be ["*"] alone or a list of emails'),
    ("[channels.ops]\ndevelopers = ['ada@example.com']\n", {},
     "channels.ops.developers is set, but channels.ops.url is not: there is no such target"),
    ("[channels.sms]\ndevelopers = ['ada@example.com']\n", {},
     "channels.sms.developers is set, but sms is a built-in channel, which every developer may use: a developers"
     " list is for a push target ([channels.NAME] url = …)"),
])
def test_a_bad_developers_list_stops_start_up_naming_the_key(tmp_path, text, environ, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(write(tmp_path, text), environ=environ)


def test_a_renamed_setting_still_works_under_its_old_name(tmp_path):
    assert load_config(write(tmp_path, "[webhooks]\nworkers = 12\n"), environ={})["outbound.workers"] == 12
    assert load_config(environ={"PAUSEPOINT_WEBHOOKS_WORKERS": "6"})["outbound.workers"] == 6


def test_settings_that_work_but_likely_not_as_meant_are_warned_of_at_start():
    assert list(pausepoint.start_up_warnings(load_config(environ={}))) == []
    config = load_config(environ={"PAUSEPOINT_WEBHOOKS_PER_ENDPOINT": "8", "PAUSEPOINT_SERVER_HOST": "0.0.0.0"})
    assert list(pausepoint.start_up_warnings(config)) == [
        "server.base_url is not set: respond links will say http://localhost:8080, which humans elsewhere cannot open",
        "webhooks.per_endpoint = 8 is more than outbound.per_developer = 4: at most 4 deliveries to one endpoint run"
        " at once"]


def test_a_server_on_loopback_that_sends_links_without_a_base_url_is_warned_of_at_start():
    smtp = {"PAUSEPOINT_SMTP_HOST": "127.0.0.1", "PAUSEPOINT_SMTP_FROM_ADDRESS": "approvals@example.org"}
    assert list(pausepoint.start_up_warnings(load_config(environ=smtp))) == [
        "server.base_url is not set: live email messages will carry respond links to http://127.0.0.1:8080, which"
        " only this machine can open; set it to the address people's phones reach"]
    with_base_url = {**smtp, "PAUSEPOINT_SERVER_BASE_URL": "https://pausepoint.example.org"}
    assert list(pausepoint.start_up_warnings(load_config(environ=with_base_url))) == []


def test_a_variable_overriding_the_config_files_value_is_said(tmp_path, caplog):
    """As in a container, whose image sets database.path and server.host by its environment."""
    path = write(tmp_path, "[database]\npath = '/srv/pp.db'\n[server]\nhost = '0.0.0.0'\n")
    with caplog.at_level("WARNING", logger="pausepoint"):
        config = load_config(path, environ={"PAUSEPOINT_DATABASE_PATH": "/data/pausepoint.db",
                                            "PAUSEPOINT_SERVER_HOST": "0.0.0.0", "PAUSEPOINT_SERVER_PORT": "9000"})
    assert config["database.path"] == "/data/pausepoint.db" and config["server.port"] == 9000
    assert [record.getMessage() for record in caplog.records] == [
        f"database.path in {path} is overridden by $PAUSEPOINT_DATABASE_PATH ('/data/pausepoint.db')"]


@pytest.mark.parametrize("text, environ", [
    ("[smtp]\npassword = 20242024\n", {}),                                       # digits, left unquoted
    ("[channels.chat]\nurl = 'slak://hunter2/B7/C9'\n", {}),                      # a misspelt scheme
    ("[twilio]\nauth_token = 20242024\n", {}),
    ("[smtp]\npassword = 'placeholder'\n", {"PAUSEPOINT_SMTP_PASSWORD": "hunter2"}),     # overridden, and said
])
def test_a_credential_in_the_config_is_never_written_to_the_log_or_a_message(tmp_path, text, environ):
    (tmp_path / "config.toml").write_text(text)
    result = run_cli(tmp_path, "--config", str(tmp_path / "config.toml"), "verify-audit", env=environ)
    key = re.search(r"\[([\w.]+)\]\n(\w+)", text).group(1, 2)
    assert result.returncode == 2 and ".".join(key) in result.stderr, result.stderr
    assert "hunter2" not in result.stderr and "20242024" not in result.stderr, result.stderr


@pytest.mark.parametrize("text, mode, warned", [
    ("[smtp]\npassword = 'hunter2'\n", 0o644, True),
    ("[channels.ops]\nurl = 'ntfy://ntfy.example.org/approvals'\n", 0o640, True),
    ("[smtp]\npassword = 'hunter2'\n", 0o600, False),
    ("[server]\nport = 9000\n[smtp]\npassword = ''\n", 0o644, False),      # no credential in it
])
def test_a_config_file_others_may_read_is_said_when_it_holds_a_credential(tmp_path, caplog, text, mode, warned):
    path = write(tmp_path, text)
    os.chmod(path, mode)
    with caplog.at_level("WARNING", logger="pausepoint"):
        load_config(path, environ={})
    said = [record.getMessage() for record in caplog.records]
    if not warned:
        assert said == []
        return
    key = re.search(r"\[([\w.]+)\]\n(\w+)", text).group(1, 2)
    assert said == [f"others than its owner may read or write the config file {path}: chmod 600 it, owned by"
                    f" the user the server runs as (chown {os.getuid()} it; a file mounted into a container, on"
                    f" the host): it holds {'.'.join(key)}"]
    assert "hunter2" not in said[0] and "ntfy.example.org" not in said[0]
