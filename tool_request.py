"""The tools a request offers, read once from the OpenAI body, and the operator's CLIENT_TOOLS policy.

`tools` entries of type function (and the deprecated `functions`) with `tool_choice` (or
`function_call`) and `parallel_tool_calls` become one ToolRequest; the prompt (tool_prompt.py) and
the call parser (tool_calls.py) read only that. Ill-typed fields are a ToolRequestError naming the
field, so the client gets a 400 that says what to fix.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolSpec:
    """One callable function the client offered."""
    name: str
    description: str
    parameters: dict  # JSON Schema, may be {}


@dataclass(frozen=True)
class ToolRequest:
    """What the request asked for, normalised: the offered tools, the choice ("auto", "required",
    "none" or "function" with `forced_name`), whether calls may come several at once, and whether
    the tools came from the deprecated `functions` field (`legacy`), whose answer shape
    (`function_call`) holds a single call."""
    tools: tuple  # of ToolSpec
    choice: str
    forced_name: str | None = None
    parallel: bool = True
    legacy: bool = False

    def tool(self, name):
        """The offered tool called exactly `name`, or None."""
        for spec in self.tools:
            if spec.name == name:
                return spec
        return None


class ToolRequestError(ValueError):
    """An ill-typed tools request; `param` names the offending field for the 400 body."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param
        self.message = message


def _function_spec(fn, param):
    if not isinstance(fn, dict):
        raise ToolRequestError(param, f"'{param}' must be an object with a 'name'.")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolRequestError(f"{param}.name", f"'{param}.name' is required and must be a non-empty string.")
    description = fn.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise ToolRequestError(f"{param}.description", f"'{param}.description' must be a string.")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise ToolRequestError(f"{param}.parameters", f"'{param}.parameters' must be a JSON Schema object.")
    return ToolSpec(name.strip(), description.strip(), parameters)


def _choice_name(value):
    """The function a dict-shaped choice names (Chat, Responses and Anthropic spellings)."""
    fn = value.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return fn["name"]
    return value.get("name") if isinstance(value.get("name"), str) else None


def tool_request(body):
    """The normalised tools request of an OpenAI body, or None when no tool can be called.

    `tools` entries of type function are used (custom and other types are ignored: Dify
    cannot honour them); legacy `functions` too. `tool_choice` (or legacy `function_call`)
    "none" turns tools off. Raises ToolRequestError for ill-typed tools and for a choice
    naming a function that was not offered.
    """
    specs, legacy = _offered(body)
    if not specs:
        return None
    choice, forced, allowed = _choice(body, {spec.name for spec in specs})
    if allowed is not None:
        specs = [spec for spec in specs if spec.name in allowed]
        if not specs:
            return None
    if choice == "none":
        return None
    return ToolRequest(tuple(specs), choice, forced, _parallel(body, legacy), legacy)


def _offered(body):
    """(the offered functions, first of each name; whether they came from legacy `functions` only)."""
    specs = []
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ToolRequestError("tools", "'tools' must be an array of tools.")
    for index, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise ToolRequestError(f"tools[{index}]", f"'tools[{index}]' must be an object.")
        if tool.get("type", "function") == "function":
            specs.append(_function_spec(tool.get("function"), f"tools[{index}].function"))
    functions = body.get("functions")
    if functions is not None and not isinstance(functions, list):
        raise ToolRequestError("functions", "'functions' must be an array of functions.")
    legacy = bool(functions) and not specs
    specs.extend(_function_spec(fn, f"functions[{index}]") for index, fn in enumerate(functions or ()))
    first = {}
    for spec in specs:
        first.setdefault(spec.name, spec)
    return list(first.values()), legacy


def _choice(body, names):
    """(choice, the forced function's name or None, the names `allowed_tools` keeps or None) of
    `tool_choice` (or legacy `function_call`); `names` are the offered functions."""
    param = "tool_choice"
    choice = body.get("tool_choice")
    if choice is None and body.get("function_call") is not None:
        param, choice = "function_call", body.get("function_call")
    if choice is None:
        return "auto", None, None
    if isinstance(choice, str):
        choice = {"any": "required"}.get(choice, choice)
        if choice not in ("none", "auto", "required"):
            raise ToolRequestError(param, f"'{param}' must be \"none\", \"auto\", \"required\" or name a function.")
        return choice, None, None
    if not isinstance(choice, dict):
        raise ToolRequestError(param, f"'{param}' must be a string or an object.")
    kind = choice.get("type")
    if kind == "allowed_tools":
        return _allowed_tools(choice, param, names)
    if kind in ("none", "auto", "required", "any"):
        return ("required" if kind == "any" else kind), None, None
    if kind in (None, "function", "tool"):
        forced = _choice_name(choice)
        if forced is None:
            raise ToolRequestError(param, f"'{param}' must name a function: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.")
        if forced not in names:
            raise ToolRequestError(param, f"'{param}' names a function that is not among the tools: {forced!r}.")
        return "function", forced, None
    return "auto", None, None  # e.g. a custom tool: ignored like custom tools themselves


def _allowed_tools(choice, param, names):
    """An `allowed_tools` choice: its mode and the offered functions it keeps."""
    allowed = choice.get("allowed_tools")
    if not isinstance(allowed, dict):
        allowed = choice
    mode = allowed.get("mode", "auto")
    if mode not in ("auto", "required"):
        raise ToolRequestError(param, "'tool_choice.allowed_tools.mode' must be \"auto\" or \"required\".")
    entries = allowed.get("tools")
    if not isinstance(entries, list):
        raise ToolRequestError(param, "'tool_choice.allowed_tools.tools' must be an array.")
    kept = []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("type", "function") != "function":
            continue
        name = _choice_name(entry) if isinstance(entry, dict) else None
        if name is None or name not in names:
            raise ToolRequestError(param, f"'tool_choice' allows a function that is not among the tools: {name!r}.")
        kept.append(name)
    return mode, None, kept


def _parallel(body, legacy):
    """Whether calls may come several at once: never for legacy `functions` (one `function_call`)."""
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        return not legacy
    if not isinstance(parallel, bool):
        raise ToolRequestError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    return parallel and not legacy


def for_policy(request, policy):
    """The tools a request keeps under the operator's CLIENT_TOOLS policy: `all`; `forced` (only
    when tool_choice forces a call: all tools for "required", the named one for a function);
    `off` (none). None when no tool is left."""
    if request is None or policy == "off":
        return None
    if request.choice == "function":
        kept = tuple(spec for spec in request.tools if spec.name == request.forced_name) or request.tools
        return ToolRequest(kept, request.choice, request.forced_name, request.parallel, request.legacy)
    if policy == "forced" and request.choice != "required":
        return None
    return request
