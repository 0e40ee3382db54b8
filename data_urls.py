"""Base64 data and `data:` URLs, measured before they are decoded and decoded strictly.

Attachments arrive as base64, often tens of megabytes of it. Its decoded size is known from
its length, so a file over a limit is refused before any of it is copied; decoding is strict
(what one decoder accepts and another does not is refused with the reason) and piece by piece
into a buffer of the exact size.
"""

import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote

from file_formats import sniff_image


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


def sniff_image_head(text, start=0):
    """The image format of base64 data, from its first bytes only (for placeholders and early checks)."""
    try:
        return sniff_image(binascii.a2b_base64(text[start:start + 16]))
    except ValueError:
        return None
