"""Message content as text: the one rule for reading an OpenAI message's `content`.

Content is null, a string, or a list of parts already normalised by openai_api.py (every part a
dict with a string `type`; text parts carry a string `text`, refusals a string `refusal`). The
text of a text part (`text`, `input_text`, `output_text`) or a refusal is what was written;
parts are joined by newlines, empty ones left out.

Two readers want different things from the other parts, hence one option:
* the query Dify reads, and the transcript digest a mark is bound to, show every other part as a
  short placeholder (`[image: cat.png]`, `[file: a.pdf]`, `[audio: wav]`, `[input_json]`), never
  its data, so the model knows something was there (`placeholders=True`, the default);
* reading what the client wrote — a conversation mark inside the reply it resends, a background
  task's instructions, a title made of the user's first words — wants only the written text
  (`placeholders=False`): a placeholder is not text anyone wrote.

It is its own module because memory, tool results, marks and task detection all read content,
and they must agree on what a part says.
"""

from attachments import ATTACHMENT_PARTS, placeholder

TEXT_PARTS = ("text", "input_text", "output_text")


def part_text(part, placeholders=True):
    """One content part as text; with `placeholders`, an attachment or an unknown part is named in
    brackets, otherwise it has no text."""
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return part.get("text") or ""
    if kind == "refusal":
        return part.get("refusal") or ""
    if not placeholders:
        return ""
    if kind in ATTACHMENT_PARTS:
        return placeholder(part)
    return f"[{kind}]"


def content_text(content, placeholders=True):
    """Message content (null, a string or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(text for text in (part_text(part, placeholders) for part in content) if text)
