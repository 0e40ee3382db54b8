"""Attachments: the image, file and audio parts of the new turn, read into checked files.

Clients put images, documents and audio into user messages as base64 or as URLs. Dify takes
files only as uploads it stores (`local_file`) or as URLs it fetches itself (`remote_url`,
through its own SSRF proxy), so every attachment part is parsed and its real type sniffed
from its bytes, and each step is checked against the attachment policy (attachment_policy.py)
before anything is decoded in full or uploaded. Base64 is measured before it is decoded, so
an oversized file never costs more memory than the limit. Earlier turns keep their
attachments only as short placeholders (`[image: cat.png]`), never their data.
"""

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from attachment_policy import LOCAL, REMOTE, describe_file, file_error
from data_urls import DataURL, decode_base64, decoded_size, parse_data_url, sniff_image_head
from file_formats import (AUDIO, CUSTOM, DOCUMENT, IMAGE, NAMED_FORMATS, extension, extensions, format_for, matches,
                          mime_extension, safe_filename, sniff_image, supported_types, with_extension)

ATTACHMENT_PARTS = ("image_url", "file", "input_audio")
_MAX_URL_LENGTH = 8192


def placeholder(part):
    """An attachment part as short text, like `[image: cat.png]`: what history shows instead of the file."""
    kind = part.get("type")
    if kind == "image_url":
        name = _image_name(part["image_url"]["url"])
        return f"[image: {name}]" if name else "[image]"
    if kind == "input_audio":
        fmt = part["input_audio"].get("format")
        return f"[audio: {safe_filename(fmt)[:16]}]" if isinstance(fmt, str) and safe_filename(fmt) else "[audio]"
    if kind == "file":
        name = part["file"].get("filename")
        name = safe_filename(name) if isinstance(name, str) else ""
        return f"[file: {name}]" if name else "[file]"
    return f"[{kind}]" if kind else ""


def _image_name(url):
    """A data URL's own name, else the image type its first bytes show; a URL's last path segment."""
    if url[:5].lower() == "data:":
        try:
            data_url = parse_data_url(url)
        except ValueError:
            return ""
        if data_url.name:
            return safe_filename(data_url.name)
        found = sniff_image_head(data_url.text, data_url.start)
        return found.ext if found else ""
    parts = _split(url)
    return safe_filename(unquote(parts.path.rsplit("/", 1)[-1])) if parts else ""


def _split(url):
    """urlsplit, or None for a URL it cannot take apart (such as a broken IPv6 host)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def attachment_parts(messages, start):
    """(where, part) for every attachment in the user messages from `start` on (where the new turn starts,
    memory.new_turn_start); `where` is the part's place in the request, like `messages[4].content[1]`."""
    found = []
    for index in range(start, len(messages)):
        message = messages[index]
        content = message.get("content") if message.get("role") == "user" else None
        if isinstance(content, list):
            found.extend((f"messages[{index}].content[{position}]", part) for position, part in enumerate(content)
                         if part["type"] in ATTACHMENT_PARTS)
    return found


@dataclass
class Attachment:
    """One attachment of the new turn, decoded and checked; `data` for uploads, `url` for remote images."""

    where: str
    kind: str
    name: str
    mime: str = ""
    data: bytes = b""
    url: str = ""
    dify_type: str = ""
    digest: str = ""

    def dify_file(self, upload_id=None):
        if self.url:
            return {"type": self.dify_type, "transfer_method": REMOTE, "url": self.url}
        return {"type": self.dify_type, "transfer_method": LOCAL, "upload_file_id": upload_id}


def read_parts(policy, parts):
    """Every (where, part) of the new turn read into a checked Attachment, in order."""
    return [read_part(policy, where, part) for where, part in parts]


def read_part(policy, where, part):
    """One attachment part read into an Attachment checked against the policy; an APIError naming it if not."""
    kind = part.get("type")
    if kind == "image_url":
        return _read_image(policy, where, part.get("image_url"))
    if kind == "file":
        return _read_file(policy, where, part.get("file"))
    return _read_audio(policy, where, part.get("input_audio"))


def _read_image(policy, where, image):
    url = image["url"]
    if not url.strip():
        raise file_error(400, "invalid_image_url", where,
                         f"{where}.image_url.url must be an http(s) URL or a data: URL holding a base64 image.")
    url = url.strip()
    if url[:5].lower() == "data:":
        return _read_image_data(policy, where, url)
    parts = _split(url[:_MAX_URL_LENGTH + 1])
    if parts is None or parts.scheme.lower() not in ("http", "https"):
        shown = f"a {parts.scheme}: URL" if parts and parts.scheme else f"'{url[:40]}'"
        raise file_error(400, "invalid_image_url", where,
                         f"The image URL in {where} is {shown}, which is not supported: send an http(s) URL "
                         "(Dify fetches it) or the image itself as a base64 data: URL.")
    if not parts.hostname or len(url) > _MAX_URL_LENGTH or re.search(r"[\s\x00-\x1f\x7f]", url):
        raise file_error(400, "invalid_image_url", where,
                         f"The image URL in {where} is not a valid http(s) URL (it needs a host, no spaces, and at "
                         f"most {_MAX_URL_LENGTH} characters).")
    name = safe_filename(unquote(parts.path.rsplit("/", 1)[-1]))
    dify_type = policy.dify_type(IMAGE, extension(name), REMOTE, name or url[:100], where)
    return Attachment(where, IMAGE, name, url=url, dify_type=dify_type)


def _read_image_data(policy, where, url):
    data_url = _data_url(where, url, IMAGE)
    if data_url.mime and not data_url.mime.startswith("image/"):
        raise file_error(400, "invalid_image_url", where,
                         f"The data URL in {where} holds '{data_url.mime}', not an image. Send documents and other "
                         "files as a 'file' part.")
    name = safe_filename(data_url.name)
    policy.dify_type(IMAGE, extension(name), LOCAL, name, where)
    data = _decode(policy, where, data_url, IMAGE, name)
    found = sniff_image(data)
    if found is None:
        said = f" (its data URL says {data_url.mime})" if data_url.mime else ""
        raise file_error(400, "file_type_mismatch", where,
                         f"{describe_file(IMAGE, name, where, first=True)} is not a PNG, JPEG, WEBP or GIF image"
                         f"{said}: its bytes are something else. Convert it to one of these formats.")
    return _checked(policy, where, IMAGE, name, found, data)


def _read_file(policy, where, file):
    file_data = file.get("file_data")
    if not isinstance(file_data, str) or not file_data:
        if file.get("file_id"):
            raise file_error(400, "file_id_not_supported", where,
                             f"{where} refers to an OpenAI file id ('{str(file['file_id'])[:64]}'); this server "
                             "cannot resolve OpenAI file ids. Send the file's content instead, as "
                             "file.file_data (a base64 data: URL) with file.filename.")
        raise file_error(400, "invalid_file", where,
                         f"{where}.file has no file_data: send the file's content as a base64 data: URL in "
                         "file.file_data, with file.filename.")
    if re.match(r"(?i)https?://", file_data):
        raise file_error(400, "invalid_file", where,
                         f"{where}.file.file_data must hold the file itself (base64), not a URL.")
    data_url = _data_url(where, file_data, DOCUMENT) if file_data[:5].lower() == "data:" \
        else DataURL("", "", file_data)
    filename = file.get("filename")
    name = safe_filename(filename if isinstance(filename, str) and filename else data_url.name)
    ext = extension(name) or mime_extension(data_url.mime)
    if not ext:
        raise file_error(400, "invalid_file", where,
                         f"{describe_file(DOCUMENT, name, where, first=True)} has no type: give it a filename with "
                         "an extension (file.filename, e.g. report.pdf).")
    declared = format_for(ext)
    if declared is None and policy.takes_custom(ext):
        return _read_custom(policy, where, data_url, name, ext)
    if declared is None:
        declared = sniff_image_head(data_url.text, data_url.start)
        if declared is None:
            raise file_error(400, "unsupported_file_type", where,
                             f"{describe_file(DOCUMENT, name, where, first=True)} is a .{ext} file, which this "
                             f"server cannot send to Dify; it accepts {supported_types()}.")
    kind = declared.kind
    policy.dify_type(kind, ext, LOCAL, name, where)
    data = _decode(policy, where, data_url, kind, name)
    actual = sniff_image(data) if kind == IMAGE else declared if matches(declared, data) else None
    if actual is None:
        image = sniff_image(data)
        what = f"a {image.label}" if image else "not UTF-8 text" if declared.signature == "text" \
            else "something else"
        raise file_error(400, "file_type_mismatch", where,
                         f"{describe_file(kind, name, where, first=True)} is named as a {declared.label} (.{ext}) "
                         f"but its bytes are {what}. Send the file with its real name and type.")
    return _checked(policy, where, kind, name, actual, data)


def _checked(policy, where, kind, name, found, data):
    """A file whose bytes passed their checks, named and typed after what they really are."""
    digest = hashlib.sha256(data).hexdigest()
    name = with_extension(name, found.ext) if name else f"{kind}-{digest[:12]}.{found.ext}"
    dify_type = policy.dify_type(kind, found.ext, LOCAL, name, where)
    return Attachment(where, kind, name, found.mime, data, dify_type=dify_type, digest=digest)


def _read_custom(policy, where, data_url, name, ext):
    """A file of a type the proxy does not know but the app lists by extension: sent as it is."""
    policy.dify_type(CUSTOM, ext, LOCAL, name, where)
    data = _decode(policy, where, data_url, DOCUMENT, name)
    digest = hashlib.sha256(data).hexdigest()
    name = name or f"file-{digest[:12]}.{ext}"
    return Attachment(where, CUSTOM, name, data_url.mime or "application/octet-stream", data,
                      dify_type=CUSTOM, digest=digest)


def _read_audio(policy, where, audio):
    if not isinstance(audio.get("data"), str) or not audio["data"]:
        raise file_error(400, "invalid_audio", where,
                         f"{where}.input_audio must be an object with base64 'data' and a 'format' (wav or mp3).")
    fmt = str(audio.get("format") or "").lower()
    declared = NAMED_FORMATS.get(fmt)
    if declared is None or declared.kind != AUDIO:
        raise file_error(400, "unsupported_file_type", where,
                         f"{where}.input_audio.format is {fmt[:20] or 'missing'}; it must be one of "
                         f"{extensions(AUDIO)}.")
    data_url = DataURL("", "", audio["data"])
    if data_url.text[:5].lower() == "data:":
        data_url = _data_url(where, data_url.text, AUDIO)
    policy.dify_type(AUDIO, declared.ext, LOCAL, "", where)
    data = _decode(policy, where, data_url, AUDIO, "")
    if not matches(declared, data):
        raise file_error(400, "file_type_mismatch", where,
                         f"The audio in {where} says it is {declared.label} but its bytes are not. Set "
                         "input_audio.format to the audio's real format.")
    digest = hashlib.sha256(data).hexdigest()
    name = f"audio-{digest[:12]}.{declared.ext}"
    return Attachment(where, AUDIO, name, declared.mime, data, dify_type=policy.dify_type(
        AUDIO, declared.ext, LOCAL, name, where), digest=digest)


def _data_url(where, url, kind):
    try:
        return parse_data_url(url)
    except ValueError as error:
        raise file_error(400, "invalid_data_url", where,
                         f"The data URL of {describe_file(kind, '', where)} is malformed: {error}.")


def _decode(policy, where, data_url, kind, name):
    """The decoded bytes, after checking the size their base64 announces against the limit."""
    policy.check_size(kind, decoded_size(data_url.text, data_url.start), name, where)
    try:
        data = decode_base64(data_url.text, data_url.start)
    except ValueError as error:
        raise file_error(400, "invalid_base64", where,
                         f"{describe_file(kind, name, where, first=True)} is not valid base64: {error}.")
    if not data:
        raise file_error(400, "empty_file", where, f"{describe_file(kind, name, where, first=True)} is empty.")
    return data
