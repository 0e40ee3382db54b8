"""config.py: settings from the environment, each checked once with a message naming it."""

import pytest

from config import ConfigError, settings_from

BASE_ENV = {"DIFY_API_KEYS": "app-a, app-b", "DIFY_API_BASE": "https://dify.example/v1/", "VALID_API_KEYS": "k1"}


def test_settings_defaults_and_trailing_slash():
    settings = settings_from(BASE_ENV)
    assert settings.dify_api_keys == ("app-a", "app-b")
    assert settings.dify_api_base == "https://dify.example/v1"
    assert (settings.server_host, settings.server_port, settings.conversation_memory_mode) == ("127.0.0.1", 5000, 1)
    assert "app-a" not in repr(settings) and "k1" not in repr(settings)


@pytest.mark.parametrize("change, named", [
    ({"VALID_API_KEYS": ""}, "VALID_API_KEYS"),
    ({"DIFY_API_KEYS": " , "}, "DIFY_API_KEYS"),
    ({"DIFY_API_BASE": "dify.example"}, "DIFY_API_BASE"),
    ({"CONVERSATION_MEMORY_MODE": "3"}, "CONVERSATION_MEMORY_MODE"),
    ({"SERVER_PORT": "http"}, "SERVER_PORT"),
    ({"SERVER_PORT": "70000"}, "SERVER_PORT"),
    ({"DIFY_IDLE_TIMEOUT": "-1"}, "DIFY_IDLE_TIMEOUT"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
])
def test_bad_settings_name_the_setting(change, named):
    with pytest.raises(ConfigError) as caught:
        settings_from({**BASE_ENV, **change})
    message = str(caught.value)
    assert message.startswith(named) and "\n" not in message


def test_missing_client_keys_explains_why():
    with pytest.raises(ConfigError, match="will not start"):
        settings_from({**BASE_ENV, "VALID_API_KEYS": ""})
