"""What Dify makes besides text, written as markdown in the answer: files (an agent tool's
images, a workflow's file outputs) as images or links, and a workflow's outputs as text.

Chat clients show markdown images and links, so a file becomes visible where the answer is.
"""

import json
from urllib.parse import urljoin, urlsplit


def files_base(dify_api_base):
    """Dify serves files at its root, not under /v1; signed file URLs are relative unless Dify's
    FILES_URL is set, so they are made absolute against the API's origin."""
    parts = urlsplit(dify_api_base or "")
    return f"{parts.scheme}://{parts.netloc}/" if parts.scheme and parts.netloc else ""


def file_markdown(file, base=""):
    """A Dify file (message_file event or file output) as a markdown image, or a link for other types."""
    url = file.get("url") or file.get("remote_url") or ""
    if not isinstance(url, str) or not url:  # a malformed event's url (a number, a list) is no link
        return ""
    if base and not urlsplit(url).scheme:
        url = urljoin(base, url)
    name = file.get("filename") or ""
    if file.get("type") == "image" or str(file.get("mime_type") or "").startswith("image/"):
        return f"![{name or 'image'}]({url})"
    return f"[{name or file.get('type') or 'file'}]({url})"


def _is_file(value):
    return isinstance(value, dict) and ("dify_model_identity" in value or {"url", "type"} <= value.keys())


def render_outputs(outputs, base=""):
    """A workflow's outputs as the answer: one text output as itself, files as markdown, anything
    else (several outputs, objects) as indented JSON a person and a program can both read."""
    if not isinstance(outputs, dict) or not outputs:
        return ""
    if len(outputs) > 1:
        return json.dumps(outputs, ensure_ascii=False, indent=2, default=str)
    value = next(iter(outputs.values()))
    if isinstance(value, str):
        return value
    if _is_file(value):
        return file_markdown(value, base)
    if isinstance(value, list) and value and all(_is_file(item) for item in value):
        return "\n\n".join(file_markdown(item, base) for item in value)
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)
