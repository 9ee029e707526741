"""Settings loading: precedence, validation messages that name the setting, secret hygiene."""

from __future__ import annotations

import re
from dataclasses import fields
from decimal import Decimal
from pathlib import Path

import pytest

from poller.config.settings import ConfigError, Secret, Settings, load_settings

EXAMPLE_FILE = Path(__file__).resolve().parents[2] / "config" / "poller.example.toml"
# Recognisable so that any leak into a message or repr is easy to spot.
SECRET = "sk-live-DO-NOT-LEAK-7f3a9c"


def write_config(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "poller.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    return message


# --- precedence ---


def test_defaults_apply_when_nothing_is_given() -> None:
    assert load_settings(env={}) == Settings()


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, "smtp_port = 2525\ninterval = 60\nconcurrency = 3\n")
    env = {"POLLER_SMTP_PORT": "2526", "POLLER_INTERVAL": "61"}
    settings = load_settings(flags={"smtp_port": 2527}, env=env, config_path=path)
    assert settings.smtp_port == 2527  # flag over env and file
    assert settings.interval == 61.0  # env over file
    assert settings.concurrency == 3  # file over default
    assert settings.api_retries == Settings().api_retries  # default


def test_a_flag_left_as_none_does_not_override_env() -> None:
    settings = load_settings(flags={"smtp_host": None}, env={"POLLER_SMTP_HOST": "mail.internal"})
    assert settings.smtp_host == "mail.internal"


def test_flags_accept_strings_like_the_command_line_gives() -> None:
    flags = {"smtp_port": "2525", "allow_insecure_http": "yes", "rearm_margin": "12.50"}
    settings = load_settings(flags=flags, env={})
    assert (settings.smtp_port, settings.allow_insecure_http) == (2525, True)
    assert settings.rearm_margin == Decimal("12.50")


def test_an_empty_env_value_counts_as_unset(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'smtp_host = "from-file"\n')
    settings = load_settings(env={"POLLER_SMTP_HOST": "", "POLLER_CONFIG": path})
    assert settings.smtp_host == "from-file"


def test_poller_config_env_names_the_file_and_config_path_is_recorded(tmp_path: Path) -> None:
    path = write_config(tmp_path, "concurrency = 2\n")
    settings = load_settings(env={"POLLER_CONFIG": path})
    assert (settings.concurrency, settings.config_path) == (2, path)


def test_non_setting_poller_variables_are_tolerated() -> None:
    env = {"POLLER_TEST_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1/test"}
    assert load_settings(env=env) == Settings()


# --- parsing ---


def test_every_setting_can_come_from_its_env_variable() -> None:
    env = {
        "POLLER_API_URL": "https://api.example.com",
        "POLLER_API_KEYS": "k1",
        "POLLER_API_TOKEN": "tok",
        "POLLER_ALLOW_INSECURE_HTTP": "no",
        "POLLER_API_CONNECT_TIMEOUT": "2.5",
        "POLLER_API_READ_TIMEOUT": "9",
        "POLLER_API_RETRIES": "0",
        "POLLER_CONCURRENCY": "16",
        "POLLER_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
        "POLLER_SMTP_HOST": "smtp.example.com",
        "POLLER_SMTP_PORT": "465",
        "POLLER_SMTP_SECURITY": "SSL",
        "POLLER_SMTP_USERNAME": "mailer",
        "POLLER_SMTP_PASSWORD": "pw",
        "POLLER_SMTP_TIMEOUT": "12",
        "POLLER_MAIL_FROM": "Alerts <alerts@example.com>",
        "POLLER_BILLING_URL": "https://billing.example.com/top-up",
        "POLLER_INTERVAL": "120",
        "POLLER_JITTER": "0",
        "POLLER_REARM_MARGIN": "50.10",
        "POLLER_DELIVERY_LEASE": "600",
        "POLLER_LOG_FORMAT": "console",
        "POLLER_METRICS_PORT": "9102",
        "POLLER_METRICS_HOST": "127.0.0.1",
    }
    assert load_settings(env=env) == Settings(
        api_url="https://api.example.com",
        api_keys=(Secret("k1"),),
        api_token=Secret("tok"),
        allow_insecure_http=False,
        api_connect_timeout=2.5,
        api_read_timeout=9.0,
        api_retries=0,
        concurrency=16,
        database_url="postgresql+psycopg2://postgres@127.0.0.1:5432/test",
        smtp_host="smtp.example.com",
        smtp_port=465,
        smtp_security="ssl",
        smtp_username="mailer",
        smtp_password=Secret("pw"),
        smtp_timeout=12.0,
        mail_from="Alerts <alerts@example.com>",
        billing_url="https://billing.example.com/top-up",
        interval=120.0,
        jitter=0.0,
        rearm_margin=Decimal("50.10"),
        delivery_lease=600.0,
        log_format="console",
        metrics_port=9102,
        metrics_host="127.0.0.1",
    )


def test_env_api_key_and_api_keys_are_merged_without_duplicates() -> None:
    env = {"POLLER_API_KEYS": " k1, k2 ,,k1, ", "POLLER_API_KEY": "k2"}
    assert load_settings(env=env).api_keys == (Secret("k1"), Secret("k2"))


def test_env_api_key_alone_is_accepted() -> None:
    assert load_settings(env={"POLLER_API_KEY": "k9"}).api_keys == (Secret("k9"),)


def test_toml_api_keys_may_be_a_list_or_a_comma_string(tmp_path: Path) -> None:
    as_list = write_config(tmp_path, 'api_keys = ["k1", "k2"]\napi_key = "k3"\n')
    assert load_settings(env={}, config_path=as_list).api_keys == (
        Secret("k1"),
        Secret("k2"),
        Secret("k3"),
    )
    as_string = write_config(tmp_path, 'api_keys = "k1, k2"\n')
    assert load_settings(env={}, config_path=as_string).api_keys == (Secret("k1"), Secret("k2"))


@pytest.mark.parametrize(
    ("toml_value", "expected"),
    [
        ('"50"', Decimal("50")),
        ("50", Decimal("50")),
        ("0.1", Decimal("0.1")),
        ('"0.10"', Decimal("0.10")),
    ],
)
def test_rearm_margin_is_an_exact_decimal(
    tmp_path: Path, toml_value: str, expected: Decimal
) -> None:
    path = write_config(tmp_path, f"rearm_margin = {toml_value}\n")
    margin = load_settings(env={}, config_path=path).rearm_margin
    assert isinstance(margin, Decimal)
    assert (margin, str(margin)) == (expected, str(expected))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("Yes", True), ("false", False), ("0", False), ("no", False)],
)
def test_allow_insecure_http_reads_the_usual_boolean_words(text: str, expected: bool) -> None:
    assert load_settings(env={"POLLER_ALLOW_INSECURE_HTTP": text}).allow_insecure_http is expected


# --- validation messages name the setting as the user wrote it ---


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"POLLER_SMTP_PORT": "abc"}, "POLLER_SMTP_PORT: 'abc' is not a whole number"),
        ({"POLLER_SMTP_PORT": "0"}, "POLLER_SMTP_PORT: 0 is not a port number"),
        ({"POLLER_SMTP_PORT": "65536"}, "POLLER_SMTP_PORT: 65536 is not a port number"),
        ({"POLLER_METRICS_PORT": "70000"}, "POLLER_METRICS_PORT: 70000 is not a port number"),
        ({"POLLER_METRICS_PORT": "http"}, "POLLER_METRICS_PORT: 'http' is not a whole number"),
        ({"POLLER_SMTP_PORT": "25.5"}, "POLLER_SMTP_PORT: '25.5' is not a whole number"),
        ({"POLLER_API_URL": "api.cekura.ai"}, "POLLER_API_URL: must be an http:// or https:// URL"),
        ({"POLLER_API_URL": "ftp://x.example"}, "POLLER_API_URL: must be an http:// or https://"),
        ({"POLLER_API_URL": "https://"}, "POLLER_API_URL: must be an http(s) URL with a host"),
        ({"POLLER_API_URL": "https://h:port/"}, "POLLER_API_URL: not a valid URL"),
        (
            {"POLLER_BILLING_URL": "mailto:x@y"},
            "POLLER_BILLING_URL: must be an http:// or https://",
        ),
        ({"POLLER_INTERVAL": "0"}, "POLLER_INTERVAL: must be between 0.1 and 604800"),
        ({"POLLER_INTERVAL": "soon"}, "POLLER_INTERVAL: 'soon' is not a number"),
        ({"POLLER_INTERVAL": "inf"}, "POLLER_INTERVAL: 'inf' is not a finite number"),
        ({"POLLER_JITTER": "-1"}, "POLLER_JITTER: must be between 0 and 86400 seconds"),
        ({"POLLER_API_CONNECT_TIMEOUT": "0"}, "POLLER_API_CONNECT_TIMEOUT: must be between 0.1"),
        ({"POLLER_API_READ_TIMEOUT": "-3"}, "POLLER_API_READ_TIMEOUT: must be between 0.1"),
        ({"POLLER_SMTP_TIMEOUT": "0"}, "POLLER_SMTP_TIMEOUT: must be between 0.1 and 3600"),
        ({"POLLER_CONCURRENCY": "0"}, "POLLER_CONCURRENCY: must be between 1 and 256 (got 0)"),
        ({"POLLER_API_RETRIES": "-1"}, "POLLER_API_RETRIES: must be between 0 and 20 (got -1)"),
        ({"POLLER_DELIVERY_LEASE": "0"}, "POLLER_DELIVERY_LEASE: must be between 1 and 86400"),
        ({"POLLER_REARM_MARGIN": "-0.01"}, "POLLER_REARM_MARGIN: must be between 0 and"),
        ({"POLLER_REARM_MARGIN": "lots"}, "POLLER_REARM_MARGIN: 'lots' is not a decimal number"),
        ({"POLLER_REARM_MARGIN": "NaN"}, "POLLER_REARM_MARGIN: 'NaN' is not a finite decimal"),
        (
            {"POLLER_SMTP_SECURITY": "tls"},
            "POLLER_SMTP_SECURITY: 'tls' is not one of none, starttls, ssl",
        ),
        ({"POLLER_LOG_FORMAT": "xml"}, "POLLER_LOG_FORMAT: 'xml' is not one of json, console"),
        (
            {"POLLER_ALLOW_INSECURE_HTTP": "maybe"},
            "POLLER_ALLOW_INSECURE_HTTP: 'maybe' is not a boolean",
        ),
        ({"POLLER_DATABASE_URL": "not a url"}, "POLLER_DATABASE_URL: not a database URL"),
        (
            {"POLLER_DATABASE_URL": "nosuchdb://x/y"},
            "POLLER_DATABASE_URL: unknown database kind 'nosuchdb'",
        ),
        (
            {"POLLER_MAIL_FROM": "alerts.example.com"},
            "POLLER_MAIL_FROM: 'alerts.example.com' is not a deliverable email address",
        ),
        ({"POLLER_MAIL_FROM": "a@b@c"}, "POLLER_MAIL_FROM: 'a@b@c' is not a deliverable"),
        ({"POLLER_MAIL_FROM": "a@b\r\nBcc: x@y"}, "POLLER_MAIL_FROM: must be a single line"),
    ],
)
def test_each_bad_env_value_is_a_one_line_error_naming_the_variable(
    env: dict[str, str], expected: str
) -> None:
    assert config_error(env=env).startswith(expected)


def test_a_bad_toml_value_names_the_file_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'smtp_port = "abc"\n')
    assert (
        config_error(env={}, config_path=path) == f"{path}: smtp_port: 'abc' is not a whole number"
    )


def test_a_toml_value_of_the_wrong_type_names_the_file_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "api_url = 42\n")
    assert config_error(env={}, config_path=path) == f"{path}: api_url: 42 is not a string"


def test_a_bad_flag_names_the_flag() -> None:
    assert (
        config_error(flags={"smtp_port": "abc"}, env={})
        == "--smtp-port: 'abc' is not a whole number"
    )


def test_the_error_names_the_source_that_won(tmp_path: Path) -> None:
    path = write_config(tmp_path, "concurrency = 4\n")
    message = config_error(env={"POLLER_CONCURRENCY": "0"}, config_path=path)
    assert message.startswith("POLLER_CONCURRENCY:")


# --- the TOML file itself ---


def test_an_unknown_toml_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "smtp_prot = 25\n")
    message = config_error(env={}, config_path=path)
    assert message == f"config file {path}: unknown key 'smtp_prot' (did you mean smtp_port?)"


def test_a_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[smtp]\nhost = "x"\n')
    message = config_error(env={}, config_path=path)
    assert f"config file {path}: unknown key 'smtp'" in message


def test_a_toml_syntax_error_is_one_line_with_the_position(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'api_url = "https://x"\nsmtp_port = = 5\n')
    message = config_error(env={}, config_path=path)
    assert message.startswith(f"config file {path}: invalid TOML: ")
    assert "line 2" in message


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert config_error(env={}, config_path=missing) == f"config file {missing}: not found"


def test_a_missing_file_named_by_poller_config_says_so(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    message = config_error(env={"POLLER_CONFIG": missing})
    assert message == f"config file {missing} (from POLLER_CONFIG): not found"


def test_a_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    assert config_error(env={}, config_path=str(tmp_path)).startswith(
        f"config file {tmp_path}: cannot read it"
    )


# --- plain http is refused unless loopback or explicitly allowed ---


def test_plain_http_to_a_remote_host_is_refused_pointing_at_allow_insecure_http() -> None:
    message = config_error(env={"POLLER_API_URL": "http://api.example.com"})
    assert message.startswith("POLLER_API_URL: refusing to send the API credential over plain http")
    assert "allow_insecure_http" in message and "POLLER_ALLOW_INSECURE_HTTP" in message


def test_plain_http_to_a_remote_host_is_allowed_with_allow_insecure_http(tmp_path: Path) -> None:
    path = write_config(tmp_path, "allow_insecure_http = true\n")
    settings = load_settings(env={"POLLER_API_URL": "http://api.example.com"}, config_path=path)
    assert (settings.api_url, settings.allow_insecure_http) == ("http://api.example.com", True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.9.9.9",
        "http://localhost:8000/",
        "http://LOCALHOST",
        "http://[::1]:8000",
    ],
)
def test_plain_http_to_loopback_is_allowed(url: str) -> None:
    assert load_settings(env={"POLLER_API_URL": url}).api_url == url


@pytest.mark.parametrize(
    "url", ["http://128.0.0.1", "http://localhost.example.com", "http://[::2]"]
)
def test_plain_http_to_lookalike_hosts_is_refused(url: str) -> None:
    assert "refusing" in config_error(env={"POLLER_API_URL": url})


# --- secrets ---


def test_secrets_never_show_in_repr_or_str_of_settings() -> None:
    env = {
        "POLLER_API_KEYS": SECRET + "-a," + SECRET + "-b",
        "POLLER_API_TOKEN": SECRET + "-token",
        "POLLER_SMTP_USERNAME": "poller",
        "POLLER_SMTP_PASSWORD": SECRET + "-smtp",
        "POLLER_DATABASE_URL": f"postgresql+psycopg2://poller:{SECRET}@db.internal/poller",
    }
    settings = load_settings(env=env)
    assert settings.api_token is not None and settings.api_token.reveal() == SECRET + "-token"
    for text in (repr(settings), str(settings), f"{settings}", f"{settings.api_keys}"):
        assert SECRET not in text
    assert "db.internal" in repr(settings)  # the database URL is shown, only its password hidden


@pytest.mark.parametrize(
    "env",
    [
        {"POLLER_API_URL": f"http://api.example.com/?key={SECRET}"},
        {"POLLER_API_URL": f"http://user:{SECRET}@api.example.com/"},
        {"POLLER_API_URL": f"https://user:{SECRET}@api.example.com:notaport/"},
        {"POLLER_API_URL": f"{SECRET}://api.example.com/"},
        {"POLLER_API_URL": f"https:///?{SECRET}"},
        {"POLLER_BILLING_URL": f"ftp://x/{SECRET}"},
        {"POLLER_DATABASE_URL": f"postgresql+psycopg2://u:{SECRET}@h:port/db"},
        {"POLLER_DATABASE_URL": f"nosuchdb://u:{SECRET}@h/db"},
        {"POLLER_API_TOKEN": f"{SECRET}\nX-Injected: 1"},
        {"POLLER_API_KEYS": f"{SECRET},\r\nX: y"},
        {"POLLER_SMTP_PASSWORD": f"{SECRET}\n"},
        {"POLLER_API_KEYS": SECRET, "POLLER_SMTP_PORT": "abc"},
    ],
)
def test_secrets_never_appear_in_config_errors(env: dict[str, str]) -> None:
    assert SECRET not in config_error(env=env)


@pytest.mark.parametrize(
    "toml",
    [
        "api_keys = [1, 2]",
        f'api_keys = ["{SECRET}", 5]',
        "api_token = 12345",
        f'smtp_password = "{SECRET}"\nbogus = 1',
        f'api_token = "{SECRET}"\nbroken = ',
        f'api_key = "{SECRET}\\n"',
    ],
)
def test_secrets_in_a_bad_file_never_appear_in_config_errors(tmp_path: Path, toml: str) -> None:
    path = write_config(tmp_path, toml + "\n")
    message = config_error(env={}, config_path=path)
    assert SECRET not in message and "12345" not in message


# --- permissions warning ---


def test_a_world_readable_file_with_a_secret_gets_a_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'api_key = "{SECRET}"\n', mode=0o644)
    settings = load_settings(env={}, config_path=path)
    assert settings.warnings == (
        f"config file {path} contains secrets and is readable by other users; chmod 600 it",
    )


@pytest.mark.parametrize("secret_key", ["api_keys", "api_token", "smtp_password"])
def test_a_group_readable_file_with_any_secret_gets_a_warning(
    tmp_path: Path, secret_key: str
) -> None:
    login = 'smtp_username = "poller"\n' if secret_key == "smtp_password" else ""
    path = write_config(tmp_path, f'{login}{secret_key} = "{SECRET}"\n', mode=0o640)
    assert len(load_settings(env={}, config_path=path).warnings) == 1


def test_an_owner_only_file_with_a_secret_gets_no_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'api_key = "{SECRET}"\n', mode=0o600)
    assert load_settings(env={}, config_path=path).warnings == ()


def test_a_world_readable_file_without_secrets_gets_no_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path, "concurrency = 2\n", mode=0o644)
    assert load_settings(env={}, config_path=path).warnings == ()


# --- requirements that only some commands have ---


def test_require_credentials_fails_without_keys_or_token() -> None:
    with pytest.raises(ConfigError, match=re.escape("no API credential: set POLLER_API_KEYS")):
        load_settings(env={}).require_credentials()


@pytest.mark.parametrize("env", [{"POLLER_API_KEY": "k"}, {"POLLER_API_TOKEN": "t"}])
def test_require_credentials_passes_with_a_key_or_a_token(env: dict[str, str]) -> None:
    load_settings(env=env).require_credentials()


def test_blank_api_keys_do_not_count_as_a_credential() -> None:
    with pytest.raises(ConfigError):
        load_settings(env={"POLLER_API_KEYS": " , ,"}).require_credentials()


def test_require_mail_from() -> None:
    with pytest.raises(ConfigError, match="POLLER_MAIL_FROM is required to send email"):
        load_settings(env={}).require_mail_from()
    load_settings(env={"POLLER_MAIL_FROM": "alerts@example.com"}).require_mail_from()


# --- the example file ---


def test_the_example_file_loads_as_the_defaults() -> None:
    settings = load_settings(env={}, config_path=str(EXAMPLE_FILE))
    assert settings == Settings()
    assert settings.warnings == ()


def test_the_example_file_with_every_setting_uncommented_loads(tmp_path: Path) -> None:
    setting_line = re.compile(r"^# ([a-z_]+) = ", re.MULTILINE)
    text = EXAMPLE_FILE.read_text(encoding="utf-8")
    documented = set(setting_line.findall(text))
    settings_fields = {f.name for f in fields(Settings)} - {"config_path", "warnings"}
    assert documented == settings_fields | {"api_key"}

    path = write_config(tmp_path, setting_line.sub(r"\1 = ", text))
    settings = load_settings(env={}, config_path=path)
    assert settings.api_keys == (Secret("org-key-1"), Secret("org-key-2"), Secret("org-key-3"))
    defaults = Settings()
    for name in ("api_url", "concurrency", "database_url", "smtp_port", "rearm_margin", "interval"):
        assert getattr(settings, name) == getattr(defaults, name), name


def test_each_example_setting_is_documented_with_its_env_variable() -> None:
    lines = EXAMPLE_FILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"# ([a-z_]+) = ", line)
        if match:
            assert f"(env POLLER_{match.group(1).upper()})" in lines[number - 1], line
