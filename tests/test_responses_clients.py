"""Real Responses API clients against the proxy and the fake Dify: the OpenAI Agents SDK's default
(Responses) model running a tool loop, and Codex CLI (`codex exec`) answering a prompt."""

import asyncio
import os
import shutil
import subprocess

import pytest
from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI

from fake_dify import End, Text
from support import CLIENT_KEY

CHAT = "Chat Bot"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

set_tracing_disabled(True)


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"18 C and sunny in {city}"


def run_agent(harness, prompt, stream, **options):
    async def run():
        client = AsyncOpenAI(base_url=harness.base_url, api_key=CLIENT_KEY, max_retries=0)
        config = RunConfig(model_provider=OpenAIProvider(openai_client=client, use_responses=True),
                           tracing_disabled=True)
        agent = Agent(name="Weather", instructions="Help with the weather.", model=CHAT, tools=[get_weather])
        if not stream:
            return await Runner.run(agent, prompt, run_config=config, **options)
        result = Runner.run_streamed(agent, prompt, run_config=config, **options)
        async for _ in result.stream_events():
            pass
        return result
    return asyncio.run(run())


@pytest.mark.parametrize("stream", [False, True])
def test_agents_sdk_tool_loop(harness, stream):
    harness.dify.script(harness.key_of(CHAT), Text("Let me check. ", CALL), End())
    harness.dify.script(harness.key_of(CHAT), Text("It is 18 C and sunny in Paris."), End())
    result = run_agent(harness, "Weather in Paris?", stream)
    assert result.final_output == "It is 18 C and sunny in Paris."
    first, second = harness.chat_bodies()
    assert first["query"].startswith("<system>\nHelp with the weather.\n</system>\n\nWeather in Paris?")
    assert "- get_weather(city: string)" in first["query"]
    query = second["query"]
    call = query.index('"name": "get_weather", "arguments": {"city": "Paris"}')
    result_block = query.index('name="get_weather">\n18 C and sunny in Paris\n</tool_result>')
    assert call < result_block, "the tool's output follows its call"


@pytest.mark.parametrize("stream", [False, True])
def test_agents_sdk_tool_loop_on_server_state(harness, stream):
    """With `auto_previous_response_id` the SDK sends only the tool's output and the previous response id:
    the proxy continues the Dify conversation from the id alone."""
    harness.dify.script(harness.key_of(CHAT), Text(CALL), End())
    harness.dify.script(harness.key_of(CHAT), Text("Sunny, 18 C."), End())
    result = run_agent(harness, "Weather in Paris?", stream, auto_previous_response_id=True)
    assert result.final_output == "Sunny, 18 C."
    first, second = harness.chat_bodies()
    (conversation_id,) = harness.dify.conversations
    assert first["conversation_id"] == "" and second["conversation_id"] == conversation_id
    assert second["query"].startswith('<tool_result id="call_') and "18 C and sunny in Paris" in second["query"]
    assert 'name="get_weather">' in second["query"].split("\n")[0], "the tool named though its call was not resent"
    assert "Weather in Paris?" not in second["query"], "Dify's conversation already has the question"


# --- Codex CLI ------------------------------------------------------------------------------------

CODEX = shutil.which("codex")  # .ci/run installs it (npm install -g @openai/codex)
EXEC_CALL = '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo codex-was-here"}}\n</tool_call>'


def codex_exec(harness, tmp_path, prompt):
    """Runs `codex exec` with a custom model provider (wire_api = "responses") pointed at the proxy."""
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        f'model = "{CHAT}"\nmodel_provider = "opendify"\n\n[model_providers.opendify]\nname = "OpenDify"\n'
        f'base_url = "{harness.base_url}"\nenv_key = "OPENDIFY_API_KEY"\nwire_api = "responses"\n'
        "request_max_retries = 0\nstream_max_retries = 0\n")
    env = {**os.environ, "CODEX_HOME": str(home), "OPENDIFY_API_KEY": CLIENT_KEY, "NO_COLOR": "1"}
    return subprocess.run([CODEX, "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access", prompt],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_codex_cli_is_installed():
    assert CODEX, "Codex CLI is missing: npm install -g @openai/codex (.ci/run does this)"


@pytest.mark.skipif(not CODEX, reason="Codex CLI missing (see test_codex_cli_is_installed)")
def test_codex_exec_answers_a_prompt(harness, tmp_path):
    harness.dify.script(harness.key_of(CHAT), Text("Hello ", "from Dify."), End())
    done = codex_exec(harness, tmp_path, "Say hello")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("Hello from Dify.")
    (sent,) = harness.chat_bodies()
    assert sent["query"].rstrip().endswith("Say hello\n</user>") or "Say hello" in sent["query"]
    assert "- exec_command(cmd: string" in sent["query"] and "web_search" not in sent["query"].split("# Tools")[1]


@pytest.mark.skipif(not CODEX, reason="Codex CLI missing (see test_codex_cli_is_installed)")
def test_codex_exec_runs_a_tool_loop(harness, tmp_path):
    harness.dify.script(harness.key_of(CHAT), Text("I will run it. ", EXEC_CALL), End())
    harness.dify.script(harness.key_of(CHAT), Text("The command printed codex-was-here."), End())
    done = codex_exec(harness, tmp_path, "Run echo codex-was-here")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("The command printed codex-was-here.")
    first, second = harness.chat_bodies()
    query = second["query"]
    call = query.index('"name": "exec_command", "arguments": {"cmd": "echo codex-was-here"}')
    result = query.index('name="exec_command">')
    assert call < result and "codex-was-here" in query[result:], "the command's output follows its call"
    assert second["conversation_id"] == "", "Codex resends the history (store: false): memory mode 1"
