"""Attachments: the files of the new turn, checked against every limit, then handed to Dify.

Clients put images, documents and audio into user messages as base64 or as URLs. Dify
takes files only as uploads it stores (`local_file`) or as URLs it fetches itself
(`remote_url`, through its own SSRF proxy), and it silently drops files an app does not
accept. So every attachment is parsed, its real type sniffed from its bytes, and checked
against the proxy's limits and the app's Dify settings before a single byte is uploaded;
each breach is an OpenAI-shaped error naming the file and the limit. Base64 is measured
before it is decoded, so an oversized file never costs more memory than the limit. The
proxy never fetches a URL a client sends, and hands Dify none into the operator's network
(url_guard.py).
"""

import asyncio
import binascii
import codecs
import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from tornado.ioloop import IOLoop

import metrics
from dify_client import DifyError, StreamFailure
from errors import APIError, dify_busy, from_dify, upstream_broken, upstream_timeout, upstream_unreachable
from url_guard import URLGuard

log = logging.getLogger("opendify.files")

MB = 1024 * 1024
IMAGE, DOCUMENT, AUDIO, CUSTOM = "image", "document", "audio", "custom"
LOCAL, REMOTE = "local_file", "remote_url"
ATTACHMENT_PARTS = ("image_url", "file", "input_audio")
_MAX_URL_LENGTH = 8192
_MAX_NAME_LENGTH = 120


# --- what bytes are ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """A file format the proxy can vouch for: its Dify type, extension, MIME type and a check of its bytes."""

    kind: str
    ext: str
    mime: str
    label: str
    signature: str


def _is_text(data):
    """UTF-8 without NULs, checked in slices so a large file is never decoded into one big string."""
    if b"\0" in data:
        return False
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for start in range(0, len(view), 1 << 16):
            decoder.decode(view[start:start + (1 << 16)])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


_SIGNATURES = {
    "png": lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"),
    "jpeg": lambda data: data.startswith(b"\xff\xd8\xff"),
    "gif": lambda data: data[:6] in (b"GIF87a", b"GIF89a"),
    "webp": lambda data: data[:4] == b"RIFF" and data[8:12] == b"WEBP",
    "pdf": lambda data: data.startswith(b"%PDF-"),
    "zip": lambda data: data.startswith(b"PK\x03\x04"),
    "ole": lambda data: data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),
    "text": _is_text,
    "mp3": lambda data: data.startswith(b"ID3") or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0),
    "wav": lambda data: data[:4] == b"RIFF" and data[8:12] == b"WAVE",
    "m4a": lambda data: data[4:8] == b"ftyp",
    "amr": lambda data: data.startswith(b"#!AMR"),
}

# What Dify accepts as images (jpg jpeg png webp gif; SVG is left out: it is a script carrier).
IMAGE_FORMATS = (
    Format(IMAGE, "png", "image/png", "PNG image", "png"),
    Format(IMAGE, "jpg", "image/jpeg", "JPEG image", "jpeg"),
    Format(IMAGE, "webp", "image/webp", "WEBP image", "webp"),
    Format(IMAGE, "gif", "image/gif", "GIF image", "gif"),
)

_OOXML = "application/vnd.openxmlformats-officedocument."
# Documents and audio by extension (Dify's lists), each with the check its bytes must pass.
NAMED_FORMATS = {f.ext: f for f in (
    Format(DOCUMENT, "pdf", "application/pdf", "PDF document", "pdf"),
    Format(DOCUMENT, "docx", _OOXML + "wordprocessingml.document", "Word document", "zip"),
    Format(DOCUMENT, "xlsx", _OOXML + "spreadsheetml.sheet", "Excel workbook", "zip"),
    Format(DOCUMENT, "pptx", _OOXML + "presentationml.presentation", "PowerPoint presentation", "zip"),
    Format(DOCUMENT, "epub", "application/epub+zip", "EPUB book", "zip"),
    Format(DOCUMENT, "doc", "application/msword", "Word document", "ole"),
    Format(DOCUMENT, "xls", "application/vnd.ms-excel", "Excel workbook", "ole"),
    Format(DOCUMENT, "ppt", "application/vnd.ms-powerpoint", "PowerPoint presentation", "ole"),
    Format(DOCUMENT, "msg", "application/vnd.ms-outlook", "Outlook message", "ole"),
    Format(DOCUMENT, "txt", "text/plain", "text file", "text"),
    Format(DOCUMENT, "md", "text/markdown", "Markdown file", "text"),
    Format(DOCUMENT, "markdown", "text/markdown", "Markdown file", "text"),
    Format(DOCUMENT, "mdx", "text/markdown", "Markdown file", "text"),
    Format(DOCUMENT, "csv", "text/csv", "CSV file", "text"),
    Format(DOCUMENT, "html", "text/html", "HTML file", "text"),
    Format(DOCUMENT, "htm", "text/html", "HTML file", "text"),
    Format(DOCUMENT, "xml", "text/xml", "XML file", "text"),
    Format(DOCUMENT, "vtt", "text/vtt", "WebVTT file", "text"),
    Format(DOCUMENT, "properties", "text/plain", "properties file", "text"),
    Format(DOCUMENT, "eml", "message/rfc822", "e-mail message", "text"),
    Format(AUDIO, "mp3", "audio/mpeg", "MP3 audio", "mp3"),
    Format(AUDIO, "mpga", "audio/mpeg", "MP3 audio", "mp3"),
    Format(AUDIO, "wav", "audio/wav", "WAV audio", "wav"),
    Format(AUDIO, "m4a", "audio/mp4", "M4A audio", "m4a"),
    Format(AUDIO, "amr", "audio/amr", "AMR audio", "amr"),
)}
_EXT_ALIASES = {"jpeg": "jpg", "jpe": "jpg"}
# A MIME type's extension, for files sent without a filename: the first format listed with it wins.
_MIME_EXTS = {**{f.mime: f.ext for f in reversed((*IMAGE_FORMATS, *NAMED_FORMATS.values()))},
              "image/jpg": "jpg", "audio/mp3": "mp3", "audio/x-wav": "wav", "audio/wave": "wav",
              "text/x-markdown": "md", "application/xml": "xml"}
_FORMATS_BY_EXT = {**{f.ext: f for f in IMAGE_FORMATS}, **NAMED_FORMATS}


def matches(fmt, data):
    return _SIGNATURES[fmt.signature](data)


def sniff_image(data):
    """The image format the bytes really are (PNG, JPEG, WEBP or GIF), or None."""
    return next((f for f in IMAGE_FORMATS if matches(f, data)), None)


def format_for(ext):
    """The known format of a file extension (any case, with or without the dot), or None."""
    ext = ext.lower().lstrip(".")
    return _FORMATS_BY_EXT.get(_EXT_ALIASES.get(ext, ext))


def extension(name):
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem else ""


def extensions(kind):
    return ", ".join(sorted(ext for ext, f in NAMED_FORMATS.items() if f.kind == kind))


def supported_types():
    return f"PNG, JPEG, WEBP or GIF images; {extensions(DOCUMENT)} documents; {extensions(AUDIO)} audio"


# --- base64 and data URLs ---------------------------------------------------------------------

@dataclass(frozen=True)
class DataURL:
    """Base64 data: `text[start:]`, kept in place so that it is measured before anything is copied."""

    mime: str
    name: str
    text: str
    start: int = 0


def parse_data_url(url):
    """`data:[<mime>][;name=...][;...];base64,<data>`; ValueError says what is wrong with it."""
    comma = url.find(",", 0, 1024)
    if comma < 0:
        raise ValueError("it has no ',' ending its header within 1024 characters")
    params = url[5:comma].split(";")
    if params[-1].strip().lower() != "base64":
        raise ValueError("only base64 data URLs are supported (data:<type>;base64,<data>)")
    mime = params[0].strip().lower()
    if mime and not _MIME_TYPE.fullmatch(mime):
        raise ValueError(f"its media type {mime[:40]!r} is not a type/subtype like image/png")
    name = ""
    for param in params[1:-1]:
        key, _, value = param.partition("=")
        if key.strip().lower() in ("name", "filename"):
            name = unquote(value.strip())
    return DataURL(mime, name, url, comma + 1)


# RFC 6838 names: the type may go into the Content-Type of the part uploaded to Dify, so nothing else
# (a CR/LF would inject a header) is let through.
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


def decoded_size(text, start=0):
    """The exact size of strictly valid base64 once decoded, known without decoding it."""
    length = len(text) - start
    return max(0, length // 4 * 3 - (length > 0 and text.endswith("=")) - (length > 1 and text.endswith("==")))


_DECODE_CHUNK = 1 << 18  # base64 characters decoded at a time; a multiple of 4


def decode_base64(text, start=0):
    """Strict base64 (the standard alphabet, correctly padded, no spaces, no URL-safe letters), decoded
    piece by piece into a buffer of the exact size, so nothing but the result is held in memory."""
    if (len(text) - start) % 4:
        raise ValueError("its length is not a multiple of 4 (cut short, or missing its '=' padding)")
    data = bytearray(decoded_size(text, start))
    written = 0
    try:
        for begin in range(start, len(text), _DECODE_CHUNK):
            end = min(begin + _DECODE_CHUNK, len(text))
            if end < len(text) and text[end - 1] == "=":
                raise ValueError("excess data after padding")
            piece = binascii.a2b_base64(text[begin:end], strict_mode=True)
            data[written:written + len(piece)] = piece
            written += len(piece)
    except ValueError as error:
        reason = str(error).lower()
        raise ValueError(next((why for said, why in _BASE64_REASONS if said in reason), _BASE64_REASONS[0][1]))
    return data


_BASE64_REASONS = (
    ("only base64", "it contains characters that are not standard base64 (spaces, line breaks, URL-safe '-' "
                    "or '_', or non-ASCII)"),
    ("excess data", "it has data after its '=' padding"),
    ("padding", "its '=' padding is wrong"),
)


def _sniff_head(text, start=0):
    """The image format of base64 data, from its first bytes only (for placeholders and early checks)."""
    try:
        return sniff_image(binascii.a2b_base64(text[start:start + 16]))
    except ValueError:
        return None


# --- history placeholders ---------------------------------------------------------------------

def placeholder(part):
    """An attachment part as short text, like `[image: cat.png]`: what history shows instead of the file."""
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url", "") if isinstance(image, dict) else image
        name = _image_name(url) if isinstance(url, str) else ""
        return f"[image: {name}]" if name else "[image]"
    if kind == "input_audio":
        audio = part.get("input_audio")
        fmt = audio.get("format") if isinstance(audio, dict) else None
        return f"[audio: {safe_filename(fmt)[:16]}]" if isinstance(fmt, str) and safe_filename(fmt) else "[audio]"
    if kind == "file":
        file = part.get("file")
        name = file.get("filename") if isinstance(file, dict) else None
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
        found = _sniff_head(data_url.text, data_url.start)
        return found.ext if found else ""
    parts = _split(url)
    return safe_filename(unquote(parts.path.rsplit("/", 1)[-1])) if parts else ""


def _split(url):
    """urlsplit, or None for a URL it cannot take apart (such as a broken IPv6 host)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def safe_filename(name):
    """A filename Dify accepts: no path, none of `/ \\ : * ? " < > |` or control characters, not too long."""
    name = re.split(r"[/\\]", str(name))[-1]
    name = re.sub(r'[\x00-\x1f\x7f:*?"<>|]', "_", name).strip(" .")
    if len(name) > _MAX_NAME_LENGTH:
        ext = extension(name)
        keep = _MAX_NAME_LENGTH - len(ext) - 1 if ext and len(ext) < 16 else _MAX_NAME_LENGTH
        name = name[:keep] + ("." + ext if keep < _MAX_NAME_LENGTH else "")
    return name


def _with_ext(name, ext):
    stem = name[:-len(extension(name)) - 1] if extension(name) else name
    return f"{stem}.{ext}"


# --- the new turn's attachment parts ----------------------------------------------------------

def attachment_parts(messages):
    """(where, part) for every attachment in the user messages after the last assistant message."""
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
               default=-1)
    found = []
    for index in range(last + 1, len(messages)):
        message = messages[index]
        content = message.get("content") if isinstance(message, dict) and message.get("role") == "user" else None
        if isinstance(content, list):
            found.extend((f"messages[{index}].content[{position}]", part) for position, part in enumerate(content)
                         if isinstance(part, dict) and part.get("type") in ATTACHMENT_PARTS)
    return found


# --- what the app accepts ---------------------------------------------------------------------

@dataclass(frozen=True)
class AppRules:
    """The file settings of a Dify app, from its /parameters (`file_upload`, `system_parameters`)."""

    enabled: bool
    types: tuple = ()
    methods: tuple = ()
    extensions: tuple = ()
    number_limit: int = 0
    max_bytes: tuple = ()

    def size_limit(self, kind):
        return dict(self.max_bytes).get(kind)


def app_rules(parameters):
    """AppRules from a /parameters body; None when the proxy could not read it (Dify then decides)."""
    if not parameters:
        return None
    upload = parameters.get("file_upload") or {}
    system = parameters.get("system_parameters") or {}
    sizes = tuple((kind, int(system[key] * MB)) for kind, key in
                  ((IMAGE, "image_file_size_limit"), (DOCUMENT, "file_size_limit"), (AUDIO, "audio_file_size_limit"))
                  if isinstance(system.get(key), (int, float)) and system[key] > 0)
    if "enabled" not in upload and isinstance(upload.get("image"), dict):
        image = upload["image"]  # Dify before 0.10: an images-only setting
        return AppRules(bool(image.get("enabled")), (IMAGE,), tuple(image.get("transfer_methods") or ()),
                        (), _count(image.get("number_limits")), sizes)
    return AppRules(bool(upload.get("enabled")), tuple(upload.get("allowed_file_types") or ()),
                    tuple(upload.get("allowed_file_upload_methods") or ()),
                    tuple(e.lower().lstrip(".") for e in upload.get("allowed_file_extensions") or ()
                          if isinstance(e, str)),
                    _count(upload.get("number_limits")), sizes)


def _count(value):
    return value if isinstance(value, int) and value > 0 else 0


@dataclass(frozen=True)
class Limits:
    """The proxy's own limits (MAX_IMAGE_MB, MAX_FILE_MB, MAX_FILES)."""

    image_bytes: int = 10 * MB
    file_bytes: int = 15 * MB
    files: int = 10

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.max_image_bytes, settings.max_file_bytes, settings.max_files)


# --- one attachment, read and checked ---------------------------------------------------------

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


def _mb(size):
    return f"{size / MB:.1f}".rstrip("0").rstrip(".") + " MB"


def _refuse(status, code, where, message):
    return APIError(status, message, code=code, param=where)


def _described(kind, name, where, first=False):
    """How an error names a file: `the image 'cat.png' (messages[1].content[0])`."""
    noun = {IMAGE: "image", AUDIO: "audio"}.get(kind, "file")
    text = f"the {noun} '{name}' ({where})" if name else f"the {noun} in {where}"
    return "T" + text[1:] if first else text


class Policy:
    """What may be attached to one request for one app: the proxy's limits, narrowed by the app's settings."""

    def __init__(self, limits, app):
        self.limits = limits
        self.model = app.model_id
        self.rules = app_rules(app.parameters)

    def check_count(self, parts):
        if not parts:
            return
        where = parts[0][0]
        rules = self.rules
        if rules is not None and not rules.enabled:
            raise _refuse(400, "file_uploads_disabled", where,
                          f"The model '{self.model}' does not accept files: file upload is turned off for its Dify "
                          f"app. Remove the {len(parts)} attachment(s), starting with {where}, or enable file "
                          "upload (vision) in the app's features in Dify.")
        if self.limits.files == 0:
            raise _refuse(400, "too_many_files", where,
                          "This server accepts no attachments (MAX_FILES=0); remove them, starting with "
                          f"{where}.")
        if len(parts) > self.limits.files:
            raise _refuse(400, "too_many_files", parts[self.limits.files][0],
                          f"The new message has {len(parts)} attachments; this server accepts at most "
                          f"{self.limits.files} per request (MAX_FILES). Send fewer files.")
        if rules is not None and rules.number_limit and len(parts) > rules.number_limit:
            raise _refuse(400, "too_many_files", parts[rules.number_limit][0],
                          f"The new message has {len(parts)} attachments; the Dify app behind model "
                          f"'{self.model}' accepts at most {rules.number_limit} per message. Send fewer files.")

    def max_bytes(self, kind):
        """(limit in bytes, what sets it) for a kind of file: the smaller of the proxy's and the app's."""
        own, setting = (self.limits.image_bytes, "MAX_IMAGE_MB") if kind == IMAGE else \
            (self.limits.file_bytes, "MAX_FILE_MB")
        app = self.rules.size_limit(kind) if self.rules is not None else None
        if app is not None and app < own:
            return app, f"the Dify app's upload limit for {'images' if kind == IMAGE else kind + ' files'}"
        return own, f"this server's limit for {'images' if kind == IMAGE else 'files'} ({setting})"

    def check_size(self, kind, size, name, where):
        limit, source = self.max_bytes(kind)
        if size > limit:
            raise _refuse(413, "file_too_large", where,
                          f"{_described(kind, name, where, first=True)} is {_mb(size)}, over {source} of "
                          f"{_mb(limit)}. Send a smaller or compressed file.")

    def dify_type(self, kind, ext, method, name, where):
        """The Dify `type` for a file the app accepts; a 400 saying what it does accept otherwise."""
        rules = self.rules
        if rules is None:
            return kind
        what = _described(kind, name, where)
        if rules.methods and method not in rules.methods:
            how = ("as an uploaded file (base64)" if method == LOCAL
                   else "by URL (an http(s) image_url)")
            other = ("Send the image by URL instead." if method == LOCAL and REMOTE in rules.methods
                     else "Send it as base64 (a data: URL) instead." if LOCAL in rules.methods else "")
            raise _refuse(400, "upload_method_not_allowed", where,
                          f"The Dify app behind model '{self.model}' does not accept files {how}: {what}. {other}"
                          .rstrip())
        if not rules.types or kind in rules.types:
            return kind
        if CUSTOM in rules.types and ext in rules.extensions:
            return CUSTOM
        accepted = [t for t in rules.types if t != CUSTOM]
        if CUSTOM in rules.types and rules.extensions:
            accepted.append("." + ", .".join(rules.extensions) + " files")
        raise _refuse(400, "file_type_not_allowed", where,
                      f"The Dify app behind model '{self.model}' does not accept {kind} files, only "
                      f"{' and '.join(accepted) or 'none'}: remove {what}, or allow {kind} files in the app's "
                      "file upload settings in Dify.")

    # reading parts

    def read_all(self, parts):
        return [self.read(where, part) for where, part in parts]

    def read(self, where, part):
        kind = part.get("type")
        if kind == "image_url":
            return self._read_image(where, part.get("image_url"))
        if kind == "file":
            return self._read_file(where, part.get("file"))
        return self._read_audio(where, part.get("input_audio"))

    def _read_image(self, where, image):
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url.strip():
            raise _refuse(400, "invalid_image_url", where,
                          f"{where}.image_url.url must be an http(s) URL or a data: URL holding a base64 image.")
        url = url.strip()
        if url[:5].lower() == "data:":
            return self._read_image_data(where, url)
        parts = _split(url[:_MAX_URL_LENGTH + 1])
        if parts is None or parts.scheme.lower() not in ("http", "https"):
            shown = f"a {parts.scheme}: URL" if parts and parts.scheme else f"'{url[:40]}'"
            raise _refuse(400, "invalid_image_url", where,
                          f"The image URL in {where} is {shown}, which is not supported: send an http(s) URL "
                          "(Dify fetches it) or the image itself as a base64 data: URL.")
        if not parts.hostname or len(url) > _MAX_URL_LENGTH or re.search(r"[\s\x00-\x1f\x7f]", url):
            raise _refuse(400, "invalid_image_url", where,
                          f"The image URL in {where} is not a valid http(s) URL (it needs a host, no spaces, and at "
                          f"most {_MAX_URL_LENGTH} characters).")
        name = safe_filename(unquote(parts.path.rsplit("/", 1)[-1]))
        dify_type = self.dify_type(IMAGE, extension(name), REMOTE, name or url[:100], where)
        return Attachment(where, IMAGE, name, url=url, dify_type=dify_type)

    def _read_image_data(self, where, url):
        data_url = self._data_url(where, url, IMAGE)
        if data_url.mime and not data_url.mime.startswith("image/"):
            raise _refuse(400, "invalid_image_url", where,
                          f"The data URL in {where} holds '{data_url.mime}', not an image. Send documents and other "
                          "files as a 'file' part.")
        name = safe_filename(data_url.name)
        self.dify_type(IMAGE, extension(name), LOCAL, name, where)
        data = self._decode(where, data_url, IMAGE, name)
        found = sniff_image(data)
        if found is None:
            said = f" (its data URL says {data_url.mime})" if data_url.mime else ""
            raise _refuse(400, "file_type_mismatch", where,
                          f"{_described(IMAGE, name, where, first=True)} is not a PNG, JPEG, WEBP or GIF image"
                          f"{said}: its bytes are something else. Convert it to one of these formats.")
        return self._checked(where, IMAGE, name, found, data)

    def _read_file(self, where, file):
        if not isinstance(file, dict):
            raise _refuse(400, "invalid_file", where,
                          f"{where}.file must be an object with 'file_data' and 'filename'.")
        file_data = file.get("file_data")
        if not isinstance(file_data, str) or not file_data:
            if file.get("file_id"):
                raise _refuse(400, "file_id_not_supported", where,
                              f"{where} refers to an OpenAI file id ('{str(file['file_id'])[:64]}'); this server "
                              "cannot resolve OpenAI file ids. Send the file's content instead, as "
                              "file.file_data (a base64 data: URL) with file.filename.")
            raise _refuse(400, "invalid_file", where,
                          f"{where}.file has no file_data: send the file's content as a base64 data: URL in "
                          "file.file_data, with file.filename.")
        if re.match(r"(?i)https?://", file_data):
            raise _refuse(400, "invalid_file", where,
                          f"{where}.file.file_data must hold the file itself (base64), not a URL.")
        data_url = self._data_url(where, file_data, DOCUMENT) if file_data[:5].lower() == "data:" \
            else DataURL("", "", file_data)
        filename = file.get("filename")
        name = safe_filename(filename if isinstance(filename, str) and filename else data_url.name)
        ext = extension(name) or _MIME_EXTS.get(data_url.mime, "")
        if not ext:
            raise _refuse(400, "invalid_file", where,
                          f"{_described(DOCUMENT, name, where, first=True)} has no type: give it a filename with "
                          "an extension (file.filename, e.g. report.pdf).")
        declared = format_for(ext)
        if declared is None and self._custom(ext):
            return self._read_custom(where, data_url, name, ext)
        if declared is None:
            declared = _sniff_head(data_url.text, data_url.start)
            if declared is None:
                raise _refuse(400, "unsupported_file_type", where,
                              f"{_described(DOCUMENT, name, where, first=True)} is a .{ext} file, which this "
                              f"server cannot send to Dify; it accepts {supported_types()}.")
        kind = declared.kind
        self.dify_type(kind, ext, LOCAL, name, where)
        data = self._decode(where, data_url, kind, name)
        actual = sniff_image(data) if kind == IMAGE else declared if matches(declared, data) else None
        if actual is None:
            image = sniff_image(data)
            what = f"a {image.label}" if image else "not UTF-8 text" if declared.signature == "text" \
                else "something else"
            raise _refuse(400, "file_type_mismatch", where,
                          f"{_described(kind, name, where, first=True)} is named as a {declared.label} (.{ext}) "
                          f"but its bytes are {what}. Send the file with its real name and type.")
        return self._checked(where, kind, name, actual, data)

    def _checked(self, where, kind, name, found, data):
        """A file whose bytes passed their checks, named and typed after what they really are."""
        digest = hashlib.sha256(data).hexdigest()
        name = _with_ext(name, found.ext) if name else f"{kind}-{digest[:12]}.{found.ext}"
        dify_type = self.dify_type(kind, found.ext, LOCAL, name, where)
        return Attachment(where, kind, name, found.mime, data, dify_type=dify_type, digest=digest)

    def _custom(self, ext):
        """Whether the app takes files of this extension as Dify's `custom` type."""
        return self.rules is not None and CUSTOM in self.rules.types and ext in self.rules.extensions

    def _read_custom(self, where, data_url, name, ext):
        """A file of a type the proxy does not know but the app lists by extension: sent as it is."""
        self.dify_type(CUSTOM, ext, LOCAL, name, where)
        data = self._decode(where, data_url, DOCUMENT, name)
        digest = hashlib.sha256(data).hexdigest()
        name = name or f"file-{digest[:12]}.{ext}"
        return Attachment(where, CUSTOM, name, data_url.mime or "application/octet-stream", data,
                          dify_type=CUSTOM, digest=digest)

    def _read_audio(self, where, audio):
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str) or not audio["data"]:
            raise _refuse(400, "invalid_audio", where,
                          f"{where}.input_audio must be an object with base64 'data' and a 'format' (wav or mp3).")
        fmt = str(audio.get("format") or "").lower()
        declared = NAMED_FORMATS.get(fmt)
        if declared is None or declared.kind != AUDIO:
            raise _refuse(400, "unsupported_file_type", where,
                          f"{where}.input_audio.format is {fmt[:20] or 'missing'}; it must be one of "
                          f"{extensions(AUDIO)}.")
        data_url = DataURL("", "", audio["data"])
        if data_url.text[:5].lower() == "data:":
            data_url = self._data_url(where, data_url.text, AUDIO)
        self.dify_type(AUDIO, declared.ext, LOCAL, "", where)
        data = self._decode(where, data_url, AUDIO, "")
        if not matches(declared, data):
            raise _refuse(400, "file_type_mismatch", where,
                          f"The audio in {where} says it is {declared.label} but its bytes are not. Set "
                          "input_audio.format to the audio's real format.")
        digest = hashlib.sha256(data).hexdigest()
        name = f"audio-{digest[:12]}.{declared.ext}"
        return Attachment(where, AUDIO, name, declared.mime, data, dify_type=self.dify_type(
            AUDIO, declared.ext, LOCAL, name, where), digest=digest)

    def _data_url(self, where, url, kind):
        try:
            return parse_data_url(url)
        except ValueError as error:
            raise _refuse(400, "invalid_data_url", where,
                          f"The data URL of {_described(kind, '', where)} is malformed: {error}.")

    def _decode(self, where, data_url, kind, name):
        """The decoded bytes, after checking the size their base64 announces against the limit."""
        self.check_size(kind, decoded_size(data_url.text, data_url.start), name, where)
        try:
            data = decode_base64(data_url.text, data_url.start)
        except ValueError as error:
            raise _refuse(400, "invalid_base64", where,
                          f"{_described(kind, name, where, first=True)} is not valid base64: {error}.")
        if not data:
            raise _refuse(400, "empty_file", where, f"{_described(kind, name, where, first=True)} is empty.")
        return data


# --- uploading --------------------------------------------------------------------------------

# Apps whose streaming runs Dify 1.13 executes in a worker, which meets an upload id it no longer has
# with silence instead of the 400 the proxy could mend by uploading again (captures R1/R19). A Dify
# service API has no cheap "does this upload exist" call, so these apps get their files uploaded afresh
# every time: a resent file costs one more upload, never a stream that stays silent.
UNREFUSED_UPLOAD_MODES = ("advanced-chat", "workflow")


class UploadCache:
    """Dify upload ids by (app, Dify user, content), so a file the client resends is not uploaded again.

    Bounded (the least recently used entry goes first) and expiring, because Dify may clean up
    uploads and an id must never outlive the file it names for long.
    """

    def __init__(self, size=1000, ttl=3600.0, clock=time.monotonic):
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._entries = OrderedDict()

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key, value):
        if self.size <= 0:
            return
        self._entries[key] = (self.clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, app_key, user):
        """Drops an app and user's entries: Dify lost one of their files, so none is trusted."""
        for key in [k for k in self._entries if k[0] == app_key and k[1] == user]:
            del self._entries[key]

    def __len__(self):
        return len(self._entries)


class Uploads:
    """Turns the new turn's attachments into Dify file objects, uploading concurrently and only once per
    content, app and Dify user (an identical upload already under way is shared, not repeated)."""

    def __init__(self, dify, limits=Limits(), cache=None, guard=None):
        self.dify = dify
        self.limits = limits
        self.cache = cache if cache is not None else UploadCache()
        self.guard = guard if guard is not None else URLGuard()
        self._pending = {}

    @classmethod
    def from_settings(cls, dify, settings):
        return cls(dify, Limits.from_settings(settings),
                   UploadCache(settings.upload_cache_size, settings.upload_cache_ttl),
                   URLGuard(settings.allow_private_urls))

    async def attach(self, app, messages, user, model):
        """Dify `files` for the request; any bad attachment raises before anything is uploaded."""
        parts = attachment_parts(messages)
        if not parts:
            return []
        policy = Policy(self.limits, app)
        policy.check_count(parts)
        # Decoding and hashing megabytes takes tens of milliseconds: off the event loop, other streams flow.
        attachments = await IOLoop.current().run_in_executor(None, policy.read_all, parts)
        for attachment in attachments:
            if attachment.url:
                await self.guard.check(attachment.where, attachment.url)
        local = [a for a in attachments if not a.url]
        results = await asyncio.gather(*(self._upload_id(app, user, model, a) for a in local),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        ids = dict(zip((a.where for a in local), results))
        log.debug("model %r: %d attachment(s), %d uploaded or cached", model, len(attachments), len(local))
        return [a.dify_file(ids.get(a.where)) for a in attachments]

    async def _upload_id(self, app, user, model, attachment):
        key = (app.key, user, attachment.digest, attachment.name, attachment.mime)
        cached = self.cache.get(key) if app.mode not in UNREFUSED_UPLOAD_MODES else None
        metrics.upload(hit=cached is not None)
        if cached is not None:
            log.debug("model %r: %s already uploaded; reusing it", model, attachment.where)
            return cached
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._upload(app, user, model, attachment))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(task)

    def _settle(self, key, task):
        self._pending.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self.cache.put(key, task.result())

    async def _upload(self, app, user, model, attachment):
        try:
            answer = await self.dify.upload(app.key, attachment.name, attachment.mime, attachment.data, user)
        except DifyError as error:
            raise upload_error(error, attachment, model)
        except StreamFailure as failure:
            if failure.kind == "unreachable":
                raise upstream_unreachable(model, failure.detail)
            if failure.kind == "timeout":
                raise upstream_timeout(model, self.dify.idle_timeout)
            if failure.kind == "busy":
                raise dify_busy(self.dify.max_connections, failure.detail)
            raise upstream_broken(model, f"failed while receiving {attachment.name}: {failure.detail}")
        upload_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(upload_id, str) or not upload_id:
            raise upstream_broken(model, f"answered the upload of {attachment.name} without a file id")
        log.debug("model %r: uploaded %s (%s, %d bytes)", model, attachment.where, attachment.mime,
                  len(attachment.data))
        return upload_id


def upload_error(error, attachment, model):
    """What the client sees when Dify refuses an upload: the file named, and what to change."""
    what = _described(attachment.kind, attachment.name, attachment.where)
    detail = f" ({error.message})" if error.message and error.message != "no detail" else ""
    if error.status == 413:
        return _refuse(413, "file_too_large", attachment.where,
                       f"The Dify app behind model '{model}' refused {what} as too large{detail}; it is "
                       f"{_mb(len(attachment.data))}. Send a smaller file.")
    if error.status == 415:
        return _refuse(415, "unsupported_file_type", attachment.where,
                       f"The Dify app behind model '{model}' does not accept the type of {what} "
                       f"({attachment.mime}){detail}.")
    if error.status == 400:
        return _refuse(400, error.code or "upload_rejected", attachment.where,
                       f"The Dify app behind model '{model}' refused {what}{detail}.")
    return from_dify(error.status, error.code, error.message, model)
