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
    """What the request asked for, normalised.

    `legacy` (an addition, defaulted) says the tools came from the deprecated `functions`
    field, whose answer shape (`function_call`) holds a single call.
    """
    tools: tuple  # of ToolSpec
    choice: str  # "auto" | "required" | "none" | "function"
    forced_name: str | None = None
    parallel: bool = True
    legacy: bool = False

    def tool(self, name):
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
    specs = []
    seen = set()
    legacy = False
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ToolRequestError("tools", "'tools' must be an array of tools.")
    for index, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise ToolRequestError(f"tools[{index}]", f"'tools[{index}]' must be an object.")
        if tool.get("type", "function") != "function":
            continue
        spec = _function_spec(tool.get("function"), f"tools[{index}].function")
        if spec.name not in seen:
            seen.add(spec.name)
            specs.append(spec)
    functions = body.get("functions")
    if functions is not None and not isinstance(functions, list):
        raise ToolRequestError("functions", "'functions' must be an array of functions.")
    if functions and not specs:
        legacy = True
    for index, fn in enumerate(functions or ()):
        spec = _function_spec(fn, f"functions[{index}]")
        if spec.name not in seen:
            seen.add(spec.name)
            specs.append(spec)
    if not specs:
        return None

    param = "tool_choice"
    choice = body.get("tool_choice")
    if choice is None and body.get("function_call") is not None:
        param, choice = "function_call", body.get("function_call")
    forced = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, str):
        choice = {"any": "required"}.get(choice, choice)
        if choice not in ("none", "auto", "required"):
            raise ToolRequestError(param, f"'{param}' must be \"none\", \"auto\", \"required\" or name a function.")
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "allowed_tools":
            allowed = choice.get("allowed_tools")
            if not isinstance(allowed, dict):
                allowed = choice
            mode = allowed.get("mode", "auto")
            if mode not in ("auto", "required"):
                raise ToolRequestError(param, "'tool_choice.allowed_tools.mode' must be \"auto\" or \"required\".")
            entries = allowed.get("tools")
            if not isinstance(entries, list):
                raise ToolRequestError(param, "'tool_choice.allowed_tools.tools' must be an array.")
            names = []
            for entry in entries:
                if isinstance(entry, dict) and entry.get("type", "function") != "function":
                    continue
                name = _choice_name(entry) if isinstance(entry, dict) else None
                if name is None or name not in seen:
                    raise ToolRequestError(param, f"'tool_choice' allows a function that is not among the tools: {name!r}.")
                names.append(name)
            specs = [spec for spec in specs if spec.name in names]
            if not specs:
                return None
            choice = mode
        elif kind in ("none", "auto", "required", "any"):
            choice = "required" if kind == "any" else kind
        elif kind in (None, "function", "tool"):
            forced = _choice_name(choice)
            if forced is None:
                raise ToolRequestError(param, f"'{param}' must name a function: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.")
            if forced not in seen:
                raise ToolRequestError(param, f"'{param}' names a function that is not among the tools: {forced!r}.")
            choice = "function"
        else:
            choice = "auto"  # e.g. a custom tool: ignored like custom tools themselves
    else:
        raise ToolRequestError(param, f"'{param}' must be a string or an object.")
    if choice == "none":
        return None

    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = not legacy
    elif not isinstance(parallel, bool):
        raise ToolRequestError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    elif legacy:
        parallel = False
    return ToolRequest(tuple(specs), choice, forced, parallel, legacy)



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
