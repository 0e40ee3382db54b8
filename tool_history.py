"""Past tool calls and tool results rendered back into the query, in the protocol the app is taught.

History turns go the other way from the call parser: an assistant turn's `tool_calls` are written
as the `<tool_call>` blocks the model is asked to emit (tool_prompt.py), and each `role: tool`
result as a `<tool_result id=… name=…>` block naming its call, so the model sees each call next to
its result (paired by `tool_call_id`). memory.py places these blocks in the folded history.
"""

import json

import lenient_json
from content import content_text


def _attribute(value):
    return str(value).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def render_tool_calls(tool_calls):
    """An assistant turn's `tool_calls` in our envelope, so the model sees its own past calls
    in the protocol it is asked to use. The id rides inside the JSON (a call key the parser
    accepts and ignores), next to the result block that names the same id. The calls are in the
    shape the edge gives them (openai_api.normalise_tool_call)."""
    blocks = []
    for call in tool_calls:
        function = call["function"]
        raw = function["arguments"]
        try:
            arguments = lenient_json.loads(raw) if raw.strip() else {}
        except ValueError:
            arguments = raw
        obj = {"id": call["id"]} if call.get("id") else {}
        obj.update({"name": function["name"], "arguments": arguments})
        blocks.append("<tool_call>\n" + json.dumps(obj, ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(blocks)


def render_tool_result(message, names_by_id):
    """A `role: tool` (or legacy `role: function`) message as a delimited result block that
    names the tool and the tool_call_id, so the model can pair it with its call."""
    call_id = message.get("tool_call_id") or ""
    name = message.get("name") or names_by_id.get(call_id) or ""
    attributes = (f' id="{_attribute(call_id)}"' if call_id else "") + f' name="{_attribute(name)}"'
    return f"<tool_result{attributes}>\n{content_text(message.get('content'))}\n</tool_result>"
