"""An agent's work (its rounds: thought, tools called with their inputs, what they returned), in
words a person reads in a chat client.

Dify reports each agent round as `agent_thought` events, re-sent as the round progresses, with
the tools' inputs and observations as JSON keyed by tool name. This module only reads one such
event into readable lines; what is new in a round and where it goes (thinking or the answer) is
the translator's (dify_events.py).
"""

import json

_THOUGHT_INPUT_LIMIT = 300
OBSERVATION_LIMIT = 500


def summarise(text, limit):
    """`text` at a readable size: whitespace runs collapsed, cut at a word near `limit` characters,
    saying how much was left out."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    if cut < limit * 2 // 3:
        cut = limit
    return f"{text[:cut].rstrip()} … ({len(text) - cut} more characters)"


def _parsed(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _plain(value):
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def describe_arguments(arguments):
    """A tool's input as `key: value, …` (or as itself when it is not an object)."""
    if isinstance(arguments, dict):
        return ", ".join(f"{key}: {_plain(value)}" for key, value in arguments.items())
    return "" if arguments in (None, "") else _plain(arguments)


def _label(name, labels):
    label = labels.get(name) if isinstance(labels, dict) else None
    if isinstance(label, dict):
        label = label.get("en_US") or next((v for v in label.values() if isinstance(v, str) and v), None)
    return label if isinstance(label, str) and label else name


def _per_tool(value, names):
    """Dify keys a round's tool inputs and observations by tool name; one tool may also get it bare."""
    parsed = _parsed(value)
    if isinstance(parsed, dict) and any(name in parsed for name in names):
        return [parsed.get(name) for name in names]
    if len(names) == 1:
        return [parsed]
    return [None] * (len(names) - 1) + [parsed]


def tool_uses(thought):
    """[(label, input summary, observation summary or None)] for the tools of one agent_thought."""
    names = [name for name in str(thought.get("tool") or "").split(";") if name]
    if not names:
        return []
    inputs = _per_tool(thought.get("tool_input") or "", names)
    observed = thought.get("observation") or ""
    observations = _per_tool(observed, names) if observed else [None] * len(names)
    uses = []
    for name, arguments, observation in zip(names, inputs, observations):
        summary = None if observation in (None, "") else summarise(_plain(observation), OBSERVATION_LIMIT)
        uses.append((_label(name, thought.get("tool_labels")),
                     summarise(describe_arguments(arguments), _THOUGHT_INPUT_LIMIT), summary))
    return uses


def call_line(label, arguments):
    return f"Calling **{label}** with {arguments}" if arguments else f"Calling **{label}**"


def same_text(shown, thought):
    """Whether a round's thought is text the answer already streamed (Dify sends it both ways)."""
    thought = " ".join(thought.split())
    return bool(thought) and thought in " ".join(shown.split())
