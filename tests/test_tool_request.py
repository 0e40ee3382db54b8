"""tool_request.py: the tools a request offers, read from the OpenAI body, and the CLIENT_TOOLS policy."""

import pytest

from tool_request import ToolRequestError, ToolSpec, for_policy, tool_request
from tool_samples import REQ, WEATHER_SCHEMA, body


def test_tool_request_defaults():
    req = tool_request(body())
    assert req.choice == "auto" and req.forced_name is None and req.parallel is True
    assert [t.name for t in req.tools] == ["get_weather", "search", "now"]
    assert req.tools[0] == ToolSpec("get_weather", "Get the weather for a city.", WEATHER_SCHEMA)
    assert req.tools[2].parameters == {} and req.tools[2].description == ""


def test_tool_request_none_cases():
    assert tool_request({"model": "m", "messages": []}) is None
    assert tool_request(body(tools=[])) is None
    assert tool_request(body(tool_choice="none")) is None
    assert tool_request(body(tools=[{"type": "custom", "custom": {"name": "x"}}])) is None
    assert tool_request(body(function_call="none", tools=None,
                             functions=[{"name": "f", "parameters": {}}])) is None


def test_tool_request_ignores_custom_tools():
    data = body()
    data["tools"].append({"type": "custom", "custom": {"name": "grammar"}})
    assert [t.name for t in tool_request(data).tools] == ["get_weather", "search", "now"]


def test_tool_request_choices():
    assert tool_request(body(tool_choice="required")).choice == "required"
    named = tool_request(body(tool_choice={"type": "function", "function": {"name": "search"}}))
    assert (named.choice, named.forced_name) == ("function", "search")
    assert len(named.tools) == 3
    allowed = tool_request(body(tool_choice={"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "now"}}]}}))
    assert allowed.choice == "required" and [t.name for t in allowed.tools] == ["now"]
    assert tool_request(body(parallel_tool_calls=False)).parallel is False


def test_tool_request_legacy_functions():
    req = tool_request({"functions": [{"name": "f", "description": "d", "parameters": {"type": "object"}}],
                        "function_call": {"name": "f"}})
    assert req.legacy and req.choice == "function" and req.forced_name == "f" and req.parallel is False
    assert tool_request({"functions": [{"name": "f"}], "function_call": "auto"}).choice == "auto"


@pytest.mark.parametrize("data, param", [
    (body(tools={"type": "function"}), "tools"),
    (body(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0].function.name"),
    (body(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name"),
    (body(tools=[{"type": "function"}]), "tools[0].function"),
    (body(tools=["x"]), "tools[0]"),
    (body(tools=[{"type": "function", "function": {"name": "a", "parameters": []}}]), "tools[0].function.parameters"),
    (body(tool_choice={"type": "function", "function": {"name": "missing"}}), "tool_choice"),
    (body(tool_choice="sometimes"), "tool_choice"),
    (body(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "missing"}}]}}), "tool_choice"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    (body(parallel_tool_calls="no"), "parallel_tool_calls"),
])
def test_tool_request_errors(data, param):
    with pytest.raises(ToolRequestError) as info:
        tool_request(data)
    assert info.value.param == param
    assert isinstance(info.value, ValueError) and str(info.value)


def test_policy_keeps_tools_or_forced_ones_or_none():
    forced = tool_request(body(tool_choice={"type": "function", "function": {"name": "search"}}))
    required = tool_request(body(tool_choice="required"))
    assert for_policy(REQ, "all") is REQ and for_policy(REQ, "forced") is None
    assert for_policy(REQ, "off") is None and for_policy(None, "all") is None
    assert for_policy(required, "forced") is required
    assert [spec.name for spec in for_policy(forced, "forced").tools] == ["search"]
    assert for_policy(forced, "off") is None
