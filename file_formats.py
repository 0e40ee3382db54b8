"""File formats the proxy can vouch for, told apart by their bytes, and filenames Dify accepts.

Dify files every attachment under a type (image, document, audio, or `custom` by extension)
and trusts the name and MIME type it is given. A client's name or MIME type may lie, so each
format carries the check its bytes must pass, and names are cut down to what Dify stores
safely (no path, no reserved characters, not too long).
"""

import codecs
import re
from dataclasses import dataclass

IMAGE, DOCUMENT, AUDIO, CUSTOM = "image", "document", "audio", "custom"
_MAX_NAME_LENGTH = 120


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
    """Whether the bytes pass the check of the format."""
    return _SIGNATURES[fmt.signature](data)


def sniff_image(data):
    """The image format the bytes really are (PNG, JPEG, WEBP or GIF), or None."""
    return next((f for f in IMAGE_FORMATS if matches(f, data)), None)


def format_for(ext):
    """The known format of a file extension (any case, with or without the dot), or None."""
    ext = ext.lower().lstrip(".")
    return _FORMATS_BY_EXT.get(_EXT_ALIASES.get(ext, ext))


def mime_extension(mime):
    """The extension of a MIME type, for a file sent without a filename; "" when unknown."""
    return _MIME_EXTS.get(mime, "")


def extension(name):
    """A filename's extension, lower case, without the dot ("" for none or a name like `.env`)."""
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem else ""


def extensions(kind):
    """The extensions of a kind of file, for an error that lists them."""
    return ", ".join(sorted(ext for ext, f in NAMED_FORMATS.items() if f.kind == kind))


def supported_types():
    """Every format the proxy takes, in words, for an error about a type it does not."""
    return f"PNG, JPEG, WEBP or GIF images; {extensions(DOCUMENT)} documents; {extensions(AUDIO)} audio"


def safe_filename(name):
    """A filename Dify accepts: no path, none of `/ \\ : * ? " < > |` or control characters, not too long."""
    name = re.split(r"[/\\]", str(name))[-1]
    name = re.sub(r'[\x00-\x1f\x7f:*?"<>|]', "_", name).strip(" .")
    if len(name) > _MAX_NAME_LENGTH:
        ext = extension(name)
        keep = _MAX_NAME_LENGTH - len(ext) - 1 if ext and len(ext) < 16 else _MAX_NAME_LENGTH
        name = name[:keep] + ("." + ext if keep < _MAX_NAME_LENGTH else "")
    return name


def with_extension(name, ext):
    """The name with its extension replaced by (or, without one, followed by) `ext`."""
    stem = name[:-len(extension(name)) - 1] if extension(name) else name
    return f"{stem}.{ext}"
