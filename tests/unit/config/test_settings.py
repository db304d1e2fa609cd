"""Configuration precedence, every source, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from mpcapi.config.settings import SETTINGS, ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[3]


def load(tmp_path: Path, environ: dict[str, str] | None = None, **options: Any) -> Settings:
    return load_settings(options, environ or {}, cwd=tmp_path)


def test_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.port == 3000
    assert settings.litellm_base_url == "http://litellm:4000"
    assert settings.litellm_api_key == ""
    assert settings.litellm_timeout == 600.0
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.env == "production"
    assert settings.log_format == "json"


def test_table_and_settings_agree() -> None:
    fields = {field.name for field in attrs.fields(Settings)} - {"config_file"}
    assert {setting.name for setting in SETTINGS} == fields


def test_documented_file_lists_every_key_with_its_default(tmp_path: Path) -> None:
    import tomllib

    document = tomllib.loads((REPO / "etc" / "mpcapi.toml").read_text())
    assert set(document) == {setting.name for setting in SETTINGS}
    for setting in SETTINGS:
        assert document[setting.name] == setting.default, setting.name
    from_file = load(tmp_path, config=str(REPO / "etc" / "mpcapi.toml"))
    assert attrs.evolve(from_file, config_file="") == load(tmp_path)


def test_precedence_file_dotenv_environment_options(tmp_path: Path) -> None:
    config = tmp_path / "mpcapi.toml"
    config.write_text('port = 1111\nlitellm_timeout = 11\nenv = "staging"\nhost = "127.0.0.1"\n')
    (tmp_path / ".env").write_text("PORT=2222\nLITELLM_TIMEOUT=22\nMPCAPI_HOST=127.0.0.2\n")
    environ = {"PORT": "3333", "MPCAPI_CONFIG": str(config), "MPCAPI_HOST": "127.0.0.3"}
    settings = load(tmp_path, environ, port="4444")
    assert settings.port == 4444  # option beats environment
    assert settings.host == "127.0.0.3"  # environment beats .env
    assert settings.litellm_timeout == 22  # .env beats file
    assert settings.env == "staging"  # file beats default
    assert settings.config_file == str(config)


def test_dotenv_never_overrides_the_real_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LITELLM_BASE_URL=http://from-dotenv:4000\n")
    settings = load(tmp_path, {"LITELLM_BASE_URL": "http://from-env:4000"})
    assert settings.litellm_base_url == "http://from-env:4000"
    assert load(tmp_path).litellm_base_url == "http://from-dotenv:4000"


def test_node_env_is_accepted_and_mpcapi_env_wins(tmp_path: Path) -> None:
    assert load(tmp_path, {"NODE_ENV": "development"}).env == "development"
    assert load(tmp_path, {"NODE_ENV": "development"}).log_format == "text"
    both = load(tmp_path, {"NODE_ENV": "development", "MPCAPI_ENV": "production"})
    assert both.env == "production"


def test_explicit_log_format_wins_over_env(tmp_path: Path) -> None:
    settings = load(tmp_path, {"MPCAPI_ENV": "development", "MPCAPI_LOG_FORMAT": "JSON"})
    assert settings.log_format == "json"


def test_base_url_trailing_slash_is_dropped_and_prefix_kept(tmp_path: Path) -> None:
    settings = load(tmp_path, {"LITELLM_BASE_URL": "https://gw.example/litellm/"})
    assert settings.litellm_base_url == "https://gw.example/litellm"


def test_several_base_urls(tmp_path: Path) -> None:
    settings = load(tmp_path, {"LITELLM_BASE_URL": " http://a:4000/ , http://b:4000/litellm,"})
    assert settings.litellm_base_url == "http://a:4000,http://b:4000/litellm"
    assert settings.litellm_base_urls == ["http://a:4000", "http://b:4000/litellm"]
    assert load(tmp_path).litellm_base_urls == ["http://litellm:4000"]


def test_secrets_are_masked(tmp_path: Path) -> None:
    settings = load(tmp_path, {"LITELLM_API_KEY": "sk-very-secret"})
    assert settings.litellm_api_key == "sk-very-secret"
    assert settings.masked()["litellm_api_key"] == "***"
    assert "sk-very-secret" not in repr(settings.masked())


def test_the_redis_password_is_masked(tmp_path: Path) -> None:
    settings = load(tmp_path, {"MPCAPI_REDIS_URL": "redis://:hunter2@cache:6379/0"})
    assert settings.masked()["redis_url"] == "redis://:***@cache:6379/0"
    settings = load(tmp_path, {"MPCAPI_REDIS_URL": "redis://mpc:hunter2@cache/1"})
    assert settings.masked()["redis_url"] == "redis://mpc:***@cache/1"
    assert "hunter2" not in repr(settings.masked())
    assert load(tmp_path).masked()["redis_url"] == ""


def test_litellm_passwords_are_masked(tmp_path: Path) -> None:
    urls = "http://proxy:s3cret@litellm-a:4000,http://litellm-b:4000"
    settings = load(tmp_path, {"LITELLM_BASE_URL": urls})
    assert settings.masked()["litellm_base_url"] == (
        "http://proxy:***@litellm-a:4000,http://litellm-b:4000"
    )
    assert "s3cret" not in repr(settings.masked())


@pytest.mark.parametrize(
    ("environ", "options", "names"),
    [
        ({"PORT": "abc"}, {}, "PORT:"),
        ({"PORT": "70000"}, {}, "PORT:"),
        ({}, {"port": "-1"}, "--port:"),
        ({"LITELLM_BASE_URL": "litellm:4000"}, {}, "LITELLM_BASE_URL:"),
        ({"LITELLM_BASE_URL": "ftp://litellm"}, {}, "LITELLM_BASE_URL:"),
        ({"LITELLM_BASE_URL": "http://a:4000,litellm:4000"}, {}, "LITELLM_BASE_URL:"),
        ({"LITELLM_BASE_URL": "http://a:4000,http://a:4000/"}, {}, "LITELLM_BASE_URL:"),
        ({"LITELLM_BASE_URL": " , "}, {}, "LITELLM_BASE_URL:"),
        ({"MPCAPI_UPSTREAM_PROBE_SECONDS": "0"}, {}, "MPCAPI_UPSTREAM_PROBE_SECONDS:"),
        ({"LITELLM_TIMEOUT": "-5"}, {}, "LITELLM_TIMEOUT:"),
        ({"LITELLM_TIMEOUT": "soon"}, {}, "LITELLM_TIMEOUT:"),
        ({"LITELLM_TIMEOUT": "nan"}, {}, "LITELLM_TIMEOUT:"),
        ({"MPCAPI_MAX_BODY_BYTES": "0"}, {}, "MPCAPI_MAX_BODY_BYTES:"),
        ({"MPCAPI_LOG_FORMAT": "xml"}, {}, "MPCAPI_LOG_FORMAT:"),
        ({"MPCAPI_CONFIG": "/nonexistent/mpcapi.toml"}, {}, "MPCAPI_CONFIG:"),
        ({}, {"config": "/nonexistent/mpcapi.toml"}, "--config:"),
    ],
)
def test_bad_values_name_their_key(
    tmp_path: Path, environ: dict[str, str], options: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, environ, **options)
    message = str(raised.value)
    assert message.startswith(names)
    assert "\n" not in message


def test_bad_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("litellm_timeout = -3\n")
    with pytest.raises(ConfigError, match=r"^litellm_timeout \(in .*bad.toml\):"):
        load(tmp_path, config=str(config))


def test_unknown_and_malformed_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("prot = 3000\n")
    with pytest.raises(ConfigError, match="^prot: unknown key"):
        load(tmp_path, config=str(config))
    config.write_text("port = \n")
    with pytest.raises(ConfigError, match="^MPCAPI_CONFIG: .* is not valid TOML"):
        load(tmp_path, {"MPCAPI_CONFIG": str(config)})


def test_a_malformed_file_is_named_by_the_option_that_gave_it(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = \n")
    with pytest.raises(ConfigError, match=r"^--config: .*c\.toml is not valid TOML"):
        load(tmp_path, config=str(config))
    # The option wins over the variable, and so does its name in the message.
    with pytest.raises(ConfigError, match=r"^--config: .*c\.toml is not valid TOML"):
        load(tmp_path, {"MPCAPI_CONFIG": str(tmp_path / "other.toml")}, config=str(config))


@pytest.mark.parametrize("value", ["otel-collector:4318", "ftp://collector", "http://"])
def test_an_otel_endpoint_that_is_not_a_url_stops_start_up(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": value})
    assert str(caught.value).startswith("OTEL_EXPORTER_OTLP_ENDPOINT:")


def test_the_otel_endpoint_and_service_name_come_from_either_name(tmp_path: Path) -> None:
    standard = load(
        tmp_path,
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_SERVICE_NAME": "gw"},
    )
    assert (standard.otel_endpoint, standard.otel_service_name) == ("http://collector:4318", "gw")
    ours = load(
        tmp_path,
        {
            "MPCAPI_OTEL_ENDPOINT": "http://ours:4318",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://theirs:4318",
        },
    )
    assert ours.otel_endpoint == "http://ours:4318"
    assert load(tmp_path).otel_endpoint == ""
