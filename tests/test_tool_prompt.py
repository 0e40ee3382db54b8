"""tool_prompt.py: the compact catalogue and the turn's rule that teach an app the calling protocol."""

import json
from pathlib import Path

from tool_prompt import tool_instructions
from tool_request import ToolRequest, ToolSpec, for_policy, tool_request
from tool_samples import REQ, SERIAL, body


def test_instructions_auto():
    text = tool_instructions(REQ)
    assert ("- get_weather(city: string, days?: integer (1..14), unit?: \"celsius\"|\"fahrenheit\" = \"celsius\", "
            "detailed?: boolean, tags?: string[], ratio?: number, filters?: {kind: string, max?: integer}, "
            "points?: {x: number}[]) — Get the weather for a city.\n  city: City name, e.g. Paris") in text
    assert "- search(query: string) — Search the web." in text and "\n- now()\n" in text
    assert '<tool_call>\n{"name": "TOOL_NAME", "arguments": {"PARAMETER": "value"}}\n</tool_call>' in text
    assert "Call a tool only when it helps" in text
    assert "one block per call" in text
    assert "never write those yourself" in text
    assert "must call" not in text


def test_instructions_required_named_serial():
    required = tool_instructions(tool_request(body(tool_choice="required")))
    assert required.endswith("You must call at least one tool in this reply; do not answer with text only.")
    named = tool_instructions(for_policy(
        tool_request(body(tool_choice={"type": "function", "function": {"name": "search"}})), "all"))
    assert named.endswith('You must call the tool "search" in this reply; do not answer with text only.')
    assert '{"name": "search", "arguments"' in named
    assert "- search(query: string)" in named and "get_weather" not in named
    serial = tool_instructions(SERIAL)
    assert "Call at most one tool per reply" in serial and "one block per call" not in serial
    assert tool_instructions(REQ, with_catalogue=False) == ""
    assert tool_instructions(tool_request(body(tool_choice="required")), with_catalogue=False) == (
        "You must call at least one tool in this reply; do not answer with text only.")


def test_open_webui_catalogue_is_compact():
    """Open WebUI's 36 built-in tools: 26 KB of schema, 19,027 characters in the old rendering."""
    captured = json.loads(open(Path(__file__).with_name("data") / "open-webui-0.12.4.jsonl").readlines()[1])
    text = tool_instructions(tool_request(captured["request"]))
    assert len(text) < 7600
    assert text.count("\n- ") == 36
    assert ('- create_calendar_event(title: string, start: string, end?: string, description?: string, '
            'calendar_id?: string, all_day?: boolean = false, location?: string, reminder_minutes?: integer) — '
            'Create a calendar event, reminder, or alarm.') in text
    assert 'start: Start datetime in the user\'s local time (e.g. "2026-04-20 09:00")' in text
    assert ('create_tasks(tasks: ({id?: string, content: string, status?: "pending"|"in_progress"|"completed"|'
            '"cancelled" = "pending"})[])') in text


def test_instructions_deterministic_and_schema_features():
    assert tool_instructions(REQ) == tool_instructions(tool_request(body()))
    schema = {
        "$defs": {"Address": {"type": "object", "properties": {"street": {"type": "string"}},
                              "required": ["street"]}},
        "type": "object",
        "properties": {
            "address": {"$ref": "#/$defs/Address"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Optional\n  note"},
            "mode": {"const": "fast"},
            "when": {"type": "string", "format": "date-time"},
            "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {
                "b": {"type": "object", "properties": {"c": {"type": "integer"}}}}}}},
        },
    }
    req = ToolRequest((ToolSpec("save", "Save.", schema),), "auto")
    text = tool_instructions(req)
    assert ('- save(address?: {street: string}, note?: string|null, mode?: "fast", when?: string (date-time), '
            'deep?: {a?: {b?: object}}) — Save.') in text
    assert '\n  deep.a.b is: {"type":"object","properties":{"c":{"type":"integer"}}}\n' in text
    assert tool_instructions(ToolRequest((ToolSpec("a", "", {}),), "none")) == ""
