"""The server as users run it: `python main.py`, configured by environment and `.env`."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import openai
import pytest

from support import CLIENT_KEY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(env, cwd, timeout=10):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py")], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def clean_env(**values):
    env = {k: v for k, v in os.environ.items() if k not in (
        "DIFY_API_KEYS", "DIFY_API_BASE", "VALID_API_KEYS", "SERVER_HOST", "SERVER_PORT", "CONVERSATION_MEMORY_MODE",
        "ENV_FILE")
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}  # the fake Dify is on loopback
    env.update(values)
    return env


def test_missing_client_keys_stop_startup_with_one_clear_line(tmp_path):
    result = run_main(clean_env(DIFY_API_KEYS="app-x", DIFY_API_BASE="http://127.0.0.1:9/v1"), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "VALID_API_KEYS" in lines[0] and "will not start" in lines[0]


@pytest.fixture
def project_env_file():
    """A `.env` in the project directory, as the README's first command makes (a developer's own is
    put back afterwards)."""
    path = os.path.join(ROOT, ".env")
    saved = open(path, "rb").read() if os.path.exists(path) else None
    with open(path, "w") as file:
        file.write("DIFY_API_KEYS=app-from-project\nDIFY_API_BASE=http://127.0.0.1:9/v1\nVALID_API_KEYS=k\n"
                   "CONVERSATION_MEMORY_MODE=8\n")
    yield path
    if saved is None:
        os.remove(path)
    else:
        with open(path, "wb") as file:
            file.write(saved)


def test_the_project_env_file_is_not_read_from_another_directory(tmp_path, project_env_file):
    result = run_main(clean_env(DIFY_API_KEYS="app-x", DIFY_API_BASE="http://127.0.0.1:9/v1"), tmp_path)
    assert result.returncode == 2 and "VALID_API_KEYS is empty" in result.stderr


def test_the_project_env_file_is_read_when_started_there(project_env_file):
    result = run_main(clean_env(), ROOT)
    assert result.returncode == 2 and "CONVERSATION_MEMORY_MODE='8'" in result.stderr


def test_env_file_names_the_settings_file(tmp_path, project_env_file):
    named = tmp_path / "opendify.env"
    named.write_text("DIFY_API_KEYS=app-x\nDIFY_API_BASE=http://127.0.0.1:9/v1\nVALID_API_KEYS=k\n"
                     "CONVERSATION_MEMORY_MODE=6\n")
    (tmp_path / ".env").write_text("CONVERSATION_MEMORY_MODE=7\n")
    result = run_main(clean_env(ENV_FILE=str(named)), ROOT)
    assert result.returncode == 2 and "CONVERSATION_MEMORY_MODE='6'" in result.stderr
    result = run_main(clean_env(ENV_FILE=str(tmp_path / "missing.env")), tmp_path)
    assert result.returncode == 2 and "ENV_FILE=" in result.stderr and "is not a file" in result.stderr


def test_env_file_is_read_and_real_environment_wins(tmp_path):
    (tmp_path / ".env").write_text("DIFY_API_KEYS=app-x\nDIFY_API_BASE=http://127.0.0.1:9/v1\n"
                                   "VALID_API_KEYS=k\nCONVERSATION_MEMORY_MODE=7\n")
    result = run_main(clean_env(), tmp_path)
    assert result.returncode == 2 and "CONVERSATION_MEMORY_MODE='7'" in result.stderr
    result = run_main(clean_env(CONVERSATION_MEMORY_MODE="9"), tmp_path)
    assert "CONVERSATION_MEMORY_MODE='9'" in result.stderr


def test_python_main_serves_the_apps(harness, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(DIFY_API_KEYS=",".join(app.key for app in harness.dify.apps), DIFY_API_BASE=harness.dify.base_url,
                    VALID_API_KEYS=CLIENT_KEY, SERVER_PORT=str(port))
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=5)
        deadline = time.monotonic() + 15
        while True:
            try:
                if len(client.models.list().data) == 3:
                    break
            except openai.APIConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)
        answer = client.chat.completions.create(model="Flow Bot", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Echo: hi"
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0]
    assert "listening on http://127.0.0.1:%d/v1" % port in output
    for app in harness.dify.apps:
        assert app.key not in output
    assert CLIENT_KEY not in output


def test_main_runs_on_uvloop():
    """uvloop is in requirements.txt on CPython/Linux, and main.py must actually run on it."""
    import main

    async def loop_kind():
        return type(asyncio.get_running_loop()).__module__

    assert main.run(loop_kind()).startswith("uvloop")
