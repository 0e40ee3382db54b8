"""An app's input form (Dify's `/parameters` `user_input_form`) applied to a request's `inputs`.

Dify rejects inputs that do not fit the form only once the request reaches it, in words that
do not say how to fix it from an OpenAI client. Checking here first gives a 400 that names the
variable and how to send it (the request body's `inputs`, `extra_body` in the OpenAI SDKs), and
fills in the form's defaults. Completion and workflow apps also take the user's message from a
form variable; `text_variable` chooses which.
"""

from dataclasses import dataclass

from errors import bad_request

TEXT_KINDS = ("text-input", "paragraph")
_HOW = "send it in the request body's \"inputs\" object (OpenAI SDKs: extra_body={\"inputs\": {...}})"


@dataclass(frozen=True)
class Variable:
    """One variable of the form: its name and kind (`text-input`, `paragraph`, `select`, `number`,
    `checkbox`, ...), and what Dify checks of its value, so the proxy can check the same first."""

    name: str
    kind: str
    label: str = ""
    required: bool = False
    default: object = None
    max_length: int = 0
    options: tuple = ()

    def title(self):
        """How an error names the variable: `'city' (City)`."""
        return f"'{self.name}' ({self.label})" if self.label and self.label != self.name else f"'{self.name}'"


def form_variables(parameters):
    """The variables of an app's input form in order; None when the form is unknown (no /parameters)."""
    form = (parameters or {}).get("user_input_form")
    if not isinstance(form, list):
        return None
    variables = []
    for item in form:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        kind, spec = next(iter(item.items()))
        if not isinstance(spec, dict) or not isinstance(spec.get("variable"), str) or not spec["variable"]:
            continue
        length = spec.get("max_length")
        options = spec.get("options")
        variables.append(Variable(
            name=spec["variable"], kind=kind, label=str(spec.get("label") or ""),
            required=spec.get("required") is True, default=spec.get("default"),
            max_length=length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else 0,
            options=tuple(o for o in options if isinstance(o, str)) if isinstance(options, list) else ()))
    return variables


def _missing(value):
    return value is None or value == "" or value == []


def text_variable(variables, given, preferred=""):
    """The variable the user's message goes into: `preferred` (INPUT_VARIABLE) when the form has it,
    else the form's first text or paragraph variable; an unknown form gets `preferred` or "query",
    the name Dify's own templates use. Inputs the request sets itself are never overwritten, so
    None means the message has no place in the form."""
    if variables is None:
        candidates = [preferred or "query"]
    elif preferred and any(v.name == preferred for v in variables):
        candidates = [preferred]
    else:
        candidates = [v.name for v in variables if v.kind in TEXT_KINDS]
    return next((name for name in candidates if _missing(given.get(name))), None)


def check_inputs(variables, given, text_variable=None, text_parts=lambda: ()):
    """The inputs to send: `given` checked against the form, the form's defaults filled in where a
    value is missing. A missing required value, an option not offered, a value too long or of
    the wrong type is a 400 naming the variable; `text_parts()` ((label, length) pairs, asked for
    only then) says what the text put into `text_variable` is made of, for a 400 about its length."""
    inputs = dict(given)
    for variable in variables or ():
        value = inputs.get(variable.name)
        if _missing(value):
            if not _missing(variable.default):
                inputs[variable.name] = variable.default
            elif variable.required:
                raise bad_request(f"The app needs the input {variable.title()}: {_HOW}.",
                                  param=f"inputs.{variable.name}", code="missing_input")
            continue
        problem = _problem(variable, value, text_parts if variable.name == text_variable else None)
        if problem:
            raise bad_request(problem, param=f"inputs.{variable.name}", code="invalid_input")
    return inputs


def _problem(variable, value, text_parts):
    """What is wrong with a value for a variable, or None."""
    kind = variable.kind
    if kind in TEXT_KINDS or kind == "select":
        if not isinstance(value, str):
            return f"The input {variable.title()} must be a string, not {type(value).__name__}."
        if kind == "select" and variable.options and value not in variable.options:
            return (f"The input {variable.title()} must be one of {', '.join(map(repr, variable.options))}; "
                    f"got {value!r}.")
        if variable.max_length and len(value) > variable.max_length:
            if text_parts is not None:
                return _too_long(variable, value, text_parts())
            return (f"The input {variable.title()} is {len(value)} characters long; the app allows at most "
                    f"{variable.max_length}.")
    elif kind == "number" and not _is_number(value):
        return f"The input {variable.title()} must be a number; got {value!r}."
    elif kind == "checkbox" and not isinstance(value, bool):
        return f"The input {variable.title()} must be true or false; got {value!r}."
    return None


def _too_long(variable, value, parts):
    """The 400 for a message that does not fit its input variable, naming what made the text long."""
    limit = f"the app's input {variable.title()} that receives it allows at most {variable.max_length}"
    if len(parts) <= 1:
        return (f"The message is {len(value)} characters long, but {limit}: send a shorter message, "
                "or raise the limit in the app.")
    made_of = ", ".join(f"{label} ({length:,})" for label, length in sorted(parts, key=lambda part: -part[1]))
    return (f"The text for the app is {len(value):,} characters long: {made_of}; but {limit}. Send less (a "
            "shorter system prompt, fewer earlier messages: start a new chat) or raise the limit in the app.")


def _is_number(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False
