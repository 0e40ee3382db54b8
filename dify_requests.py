"""The Dify request for one run: its path and body, built from what the run's owner decided.

Dify takes a run in three shapes (`/chat-messages`, `/completion-messages`, `/workflows/run`):
the user's text goes in `query` or in a variable of the app's input form, the client's tools
and output format are taught in that text, and the form's inputs are checked here first.
These are pure functions of their arguments: Completion decides (plans the conversation,
uploads the files, retries) and owns the run; this module says how each decision is written
for Dify, so the rules can be read and tested without a server.
"""

import memory
import tool_prompt
from apps import CHAT_FAMILY
from inputs import check_inputs, form_variables, text_variable
from tool_request import for_policy

FORM_TEXT_MODES = ("completion", "workflow")  # apps that read the user's text from their input form


def kept_tools(requested, policy, mode):
    """The client's tools a request keeps (a tool_request.ToolRequest, or None): those the operator's
    CLIENT_TOOLS `policy` for the model allows, and for completion and workflow apps (not chat
    agents) only a call the request forces."""
    kept = for_policy(requested, policy)
    if kept is not None and mode not in CHAT_FAMILY and kept.choice not in ("required", "function"):
        return None
    return kept


def offered_tools(tool_request, plan, binding):
    """(the fingerprint of the tool catalogue the conversation will have seen, for the reply's mark;
    the text teaching the client's tools, "" for none). A continued conversation that already has
    this exact catalogue is given only the turn's tool_choice rule."""
    if tool_request is None:
        return (plan.tools_seen if plan.conversation_id else None), ""
    seen = memory.tools_fingerprint(tool_prompt.catalogue(tool_request), binding)
    known = bool(plan.conversation_id) and plan.tools_seen is not None and plan.tools_seen == seen
    return seen, tool_prompt.tool_instructions(tool_request, with_catalogue=not known)


def dify_query(plan_query, tool_text, format_text):
    """The text Dify is asked: the plan's query, then how to call the client's tools, then the output
    format the client asks for."""
    query = plan_query
    for addition in (tool_text, format_text):
        if addition:
            query += "\n\n" + addition
    return query


def message_variable(app, given, input_variable):
    """(the app's input form, None when unknown; the name of the variable that receives the user's
    text, or None). Completion and workflow apps read the text from their form (`INPUT_VARIABLE`, or
    the first free text variable `given` leaves empty); chat apps take it as `query`."""
    form = form_variables(app.parameters)
    if app.mode not in FORM_TEXT_MODES:
        return form, None
    return form, text_variable(form, given, input_variable)


def fits(form, target, text):
    """Whether `text` fits the max_length of the form's variable `target` (true when it sets none)."""
    variable = next((v for v in form or () if v.name == target), None)
    return variable is None or not variable.max_length or len(text) <= variable.max_length


def app_inputs(form, given, target, text, text_parts):
    """The inputs to send: `given`, with `text` in the variable `target` when there is one, checked
    against the form (a 400 naming a bad one). `text_parts()` says what the text is made of, asked
    for only when it is too long (see inputs.check_inputs)."""
    if target is not None:
        given = {**given, target: text}
    return check_inputs(form, given, target, text_parts)


def text_parts(messages, tool_text, format_text):
    """What the text for a completion or workflow app's input is made of, as (label, length) pairs,
    so that a 400 about its size names what made it long."""
    parts = [(label, len(text)) for label, text in memory.folded_blocks(messages)]
    if tool_text:
        parts.append(("the tool catalogue", len(tool_text)))
    if format_text:
        parts.append(("the output format instruction", len(format_text)))
    return parts


def dify_request(app, user, query, inputs, target, conversation_id, files):
    """(path, body) of the streaming run for the app's mode. A completion app reads the user's text from
    its form variable `target` when it has one, else from `query`; a workflow only from its form (it has
    no `query`); neither keeps a conversation. `files`: Dify file objects, possibly none."""
    body = {"inputs": inputs, "user": user, "response_mode": "streaming"}
    if files:
        body["files"] = files
    if app.mode == "workflow":
        return "/workflows/run", body
    if app.mode == "completion":
        if target is None:
            body["query"] = query
        return "/completion-messages", body
    body.update({"query": query, "conversation_id": conversation_id, "auto_generate_name": False})
    return "/chat-messages", body
