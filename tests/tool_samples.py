"""Tool requests and answers shared by the tool tests: schemas, a request body, and helpers that
feed an answer to the call parser the way the proxy does."""

import itertools
import json

from tool_calls import ToolCallParser, openai_tool_call
from tool_request import tool_request

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14, "description": "Forecast days"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "detailed": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ratio": {"type": "number"},
        "filters": {
            "type": "object",
            "properties": {"kind": {"type": "string"}, "max": {"type": "integer"}},
            "required": ["kind"],
        },
        "points": {
            "type": "array",
            "items": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
        },
    },
    "required": ["city"],
}
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string"}},
    "required": ["query"],
    "additionalProperties": False,
}


def body(**extra):
    data = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city.",
                                              "parameters": WEATHER_SCHEMA}},
            {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                              "parameters": SEARCH_SCHEMA}},
            {"type": "function", "function": {"name": "now"}},
        ],
    }
    data.update(extra)
    return data


REQ = tool_request(body())
SERIAL = tool_request(body(parallel_tool_calls=False))


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter):024d}"


def stream(chunks, request=REQ):
    """(parser, pieces) for an answer fed to a ToolCallParser in these chunks."""
    parser = ToolCallParser(request, id_factory=ids())
    pieces = []
    for chunk in chunks:
        pieces.extend(parser.feed(chunk))
    pieces.extend(parser.finish())
    return parser, pieces


def streamed(pieces):
    """(content or None, OpenAI tool_calls): what the client gets from the pieces."""
    content = "".join(v for k, v in pieces if k == "content")
    return content or None, [openai_tool_call(c) for k, c in pieces if k == "tool_call"]


def parse(text, request=REQ):
    """A whole answer fed in one piece, as the non-streaming path feeds it."""
    return streamed(stream([text], request)[1])


def call_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def envelope(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


