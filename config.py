"""Settings from the environment and `.env`.

Real environment variables win over `.env`. Every setting is checked here, once, so
that a bad value stops start-up with one line that names the setting and the fix,
instead of surfacing later as a confusing runtime error.
"""

import os
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it and says how to fix it."""


class Settings:
    """The checked settings, as attributes named after their variables (`settings.dify_api_base`).
    Made only by `settings_from`, which holds each setting's default and check, once. Read-only; its repr
    leaves out the keys and secrets (the proxy URL may hold a password)."""

    HIDDEN = ("dify_api_keys", "valid_api_keys", "dify_proxy", "mark_secret", "metrics_key")

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are read-only: {name}")

    def __repr__(self):
        shown = ", ".join(f"{name}={value!r}" for name, value in vars(self).items() if name not in self.HIDDEN)
        return f"Settings({shown})"

    def client_tools_for(self, model):
        """The CLIENT_TOOLS policy for a model: its CLIENT_TOOLS_BY_MODEL entry, else CLIENT_TOOLS."""
        return next((policy for name, policy in self.client_tools_by_model if name == model), self.client_tools)


def _split_list(value):
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _number(env, name, default, kind, low, high):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}: set it to a number between {low} and {high}")
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is out of range: set it to a number between {low} and {high}")
    return value


def _choice(env, name, default, choices):
    value = (env.get(name, "").strip() or default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is unknown: use {', '.join(choices[:-1])} or {choices[-1]}")
    return value


_TOOL_POLICIES = ("all", "forced", "off")


def _tools_by_model(env):
    """CLIENT_TOOLS_BY_MODEL: `model=policy` pairs, comma separated (a model name may itself hold `=`:
    the last one separates)."""
    raw = env.get("CLIENT_TOOLS_BY_MODEL", "")
    pairs = []
    for entry in _split_list(raw):
        model, separator, policy = entry.rpartition("=")
        policy = policy.strip().lower()
        if not separator or not model.strip() or policy not in _TOOL_POLICIES:
            raise ConfigError(f"CLIENT_TOOLS_BY_MODEL entry {entry!r} is not model=policy: write e.g. "
                              "\"My App=off,Agent=forced\" with policies all, forced or off")
        pairs.append((model.strip(), policy))
    return tuple(pairs)


def _workers(env):
    """WORKERS: a number of processes, or `auto` for one per CPU."""
    raw = env.get("WORKERS", "").strip().lower()
    if raw == "auto":
        return os.cpu_count() or 1
    if raw and not raw.isdigit():
        raise ConfigError(f"WORKERS={raw!r} is not a number: set it to a number of processes (1 to 256) or auto")
    return _number(env, "WORKERS", 1, int, 1, 256)


_PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")


def _egress_proxy(env, dify_scheme):
    """(proxy URL or "", NO_PROXY or None) for requests to Dify, read as curl and most tools read
    them: HTTPS_PROXY for an https Dify, HTTP_PROXY for http, ALL_PROXY for either; lower case
    first. A URL without a scheme is an http proxy."""
    names = (f"{dify_scheme}_proxy", "all_proxy")
    proxy, source = "", ""
    for name in names:
        for spelled in (name, name.upper()):
            if env.get(spelled, "").strip() and not proxy:
                proxy, source = env[spelled].strip(), spelled
    if proxy:
        if "://" not in proxy:
            proxy = "http://" + proxy
        parts = urlsplit(proxy)
        if parts.scheme.lower() not in _PROXY_SCHEMES or not parts.hostname:
            raise ConfigError(f"{source} is not a proxy URL: set it like http://proxy.example:3128 "
                              f"(schemes: {', '.join(_PROXY_SCHEMES)})")
    no_proxy = env.get("no_proxy", env.get("NO_PROXY"))
    return proxy, (no_proxy.strip() if no_proxy is not None else None)


def settings_from(env):
    """Builds Settings from a mapping of variable names to strings (the environment)."""
    dify_keys = _split_list(env.get("DIFY_API_KEYS", ""))
    if not dify_keys:
        raise ConfigError(
            "DIFY_API_KEYS is empty: set it to your Dify app API keys (app-...), comma separated, "
            "one per app to serve as a model")
    if len(set(dify_keys)) != len(dify_keys):
        raise ConfigError("DIFY_API_KEYS lists the same key twice: list each Dify app key once")

    base = env.get("DIFY_API_BASE", "").strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"DIFY_API_BASE={base!r} is not an http(s) URL: set it to your Dify API address, "
            "e.g. https://api.dify.ai/v1 or http://your-dify-host/v1")

    valid_keys = _split_list(env.get("VALID_API_KEYS", ""))
    if not valid_keys:
        raise ConfigError(
            "VALID_API_KEYS is empty: set it to one or more keys (comma separated) that clients must send "
            "as 'Authorization: Bearer <key>'; the server will not start without it, because an open "
            "proxy lets anyone spend your Dify quota")

    mode = env.get("CONVERSATION_MEMORY_MODE", "1").strip() or "1"
    if mode not in ("1", "2"):
        raise ConfigError(
            f"CONVERSATION_MEMORY_MODE={mode!r} is not 1 or 2: use 1 (history folded into each query) "
            "or 2 (Dify keeps the conversation)")

    proxy, no_proxy = _egress_proxy(env, parts.scheme)
    origins = _split_list(env.get("CORS_ORIGINS", "*")) or ("*",)
    level = (env.get("LOG_LEVEL", "INFO").strip() or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL={level!r} is unknown: use DEBUG, INFO, WARNING or ERROR")

    return Settings(
        dify_api_keys=dify_keys,
        dify_api_base=base,
        valid_api_keys=valid_keys,
        server_host=env.get("SERVER_HOST", "").strip() or "127.0.0.1",
        server_port=_number(env, "SERVER_PORT", 5000, int, 0, 65535),
        conversation_memory_mode=int(mode),
        dify_connect_timeout=_number(env, "DIFY_CONNECT_TIMEOUT", 10.0, float, 0.1, 300),
        dify_idle_timeout=_number(env, "DIFY_IDLE_TIMEOUT", 90.0, float, 0.1, 3600),
        dify_max_connections=_number(env, "DIFY_MAX_CONNECTIONS", 1000, int, 1, 100000),
        dify_proxy=proxy,
        dify_no_proxy=no_proxy,
        ssl_cert_file=env.get("SSL_CERT_FILE", "").strip(),
        ssl_cert_dir=env.get("SSL_CERT_DIR", "").strip(),
        keepalive_interval=_number(env, "KEEPALIVE_INTERVAL", 10.0, float, 0.05, 300),
        model_refresh_interval=_number(env, "MODEL_REFRESH_INTERVAL", 300.0, float, 1, 86400),
        cors_origins=origins,
        log_level=level,
        max_request_bytes=_number(env, "MAX_REQUEST_MB", 40, int, 1, 1024) * 1024 * 1024,
        max_image_bytes=_number(env, "MAX_IMAGE_MB", 10, int, 1, 1024) * 1024 * 1024,
        max_file_bytes=_number(env, "MAX_FILE_MB", 15, int, 1, 1024) * 1024 * 1024,
        max_files=_number(env, "MAX_FILES", 10, int, 0, 100),
        upload_cache_size=_number(env, "UPLOAD_CACHE_SIZE", 1000, int, 0, 1000000),
        upload_cache_ttl=_number(env, "UPLOAD_CACHE_TTL", 3600.0, float, 1, 7 * 86400),
        mark_secret=env.get("MARK_SECRET", "").strip(),
        agent_work=_choice(env, "AGENT_WORK", "reasoning", ("reasoning", "inline", "hidden")),
        think_tags=_choice(env, "THINK_TAGS", "reasoning", ("reasoning", "keep", "hidden")),
        workflow_progress=_choice(env, "WORKFLOW_PROGRESS", "off", ("off", "reasoning")),
        input_variable=env.get("INPUT_VARIABLE", "").strip(),
        smooth_streaming=_choice(env, "SMOOTH_STREAMING", "on", ("on", "off")) == "on",
        smooth_max_lag=_number(env, "SMOOTH_MAX_LAG_MS", 400, int, 0, 2000) / 1000,
        smooth_frame=_number(env, "SMOOTH_FRAME_MS", 20, int, 5, 100) / 1000,
        workers=_workers(env),
        shutdown_grace=_number(env, "SHUTDOWN_GRACE_S", 5.0, float, 0, 3600),
        metrics_key=env.get("METRICS_KEY", "").strip(),
        health_details=_choice(env, "HEALTH_DETAILS", "off", ("off", "on")) == "on",
        client_stall_timeout=_number(env, "CLIENT_STALL_TIMEOUT", 60.0, float, 0.1, 3600),
        client_tools=_choice(env, "CLIENT_TOOLS", "all", _TOOL_POLICIES),
        client_tools_by_model=_tools_by_model(env),
        task_model=env.get("TASK_MODEL", "").strip(),
        allow_private_urls=_choice(env, "ALLOW_PRIVATE_URLS", "off", ("off", "on")) == "on",
    )


def load_settings(env_file=None):
    """Settings from the real environment over a `.env` file: ENV_FILE when set (a missing one is an
    error), else `.env` in the working directory. Never the one beside this file: a server started
    from elsewhere (a test, a second instance) must not pick up whatever a developer's checkout holds."""
    if env_file is None:
        named = os.environ.get("ENV_FILE", "").strip()
        if named and not Path(named).is_file():
            raise ConfigError(f"ENV_FILE={named!r} is not a file: point it at your settings file, or unset it to "
                              "read .env from the working directory")
        env_file = Path(named) if named else Path.cwd() / ".env"
    merged = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if Path(env_file).is_file() else {}
    merged.update(os.environ)
    return settings_from(merged)
