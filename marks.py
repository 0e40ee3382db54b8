"""Invisible conversation marks for memory mode 2.

In memory mode 2 the proxy hides the Dify conversation id inside the assistant
reply and reads it back from the history the client resends.  This module is
the encoding: ``make_mark`` builds a mark, ``find_conversation`` finds the
newest valid one in a message's content, ``strip_marks`` removes mark-shaped
runs so histories can be compared and text shown clean.

Alphabet (8 symbols, 3 bits per character)
-----------------------------------------
    U+200B ZERO WIDTH SPACE     U+2061 FUNCTION APPLICATION
    U+200C ZERO WIDTH NON-JOINER U+2062 INVISIBLE TIMES
    U+200D ZERO WIDTH JOINER    U+2063 INVISIBLE SEPARATOR
    U+2060 WORD JOINER          U+2064 INVISIBLE PLUS

Every one of them is General_Category Cf, Default_Ignorable_Code_Point (so
conformant renderers draw nothing), BMP (one UTF-16 code unit, so JS
``length`` is the character count), has no decomposition (NFC/NFD/NFKC/NFKD
leave it alone), is not White_Space and not U+FEFF, so neither Python
``str.strip()`` nor JavaScript ``trim()`` (WhiteSpace + LineTerminator: TAB, VT,
FF, SP, NBSP, U+FEFF, every Zs, LF, CR, U+2028, U+2029) removes it, and CommonMark
does not treat it as whitespace either (Unicode whitespace there = Zs + TAB, LF,
FF, CR).  None is a bidi control (U+200E/F, U+202A-E, U+2066-9 change the
display and are stripped by "Trojan Source" filters).  This is the original
OpenDify set minus its two faulty members: U+FEFF (removed by JS ``trim()``,
12 % of the old marks broke) and U+180E (a space before Unicode 6.3, rendering
varies).

Rejected: variation selectors U+FE00-FE0F (4 bits/char, but they attach to the
preceding base: VS16 after "©", "™", "↔", a digit ... switches it to emoji
presentation, a visible change); tag characters U+E0020-E007F (astral: 2 UTF-16
units and 4 UTF-8 bytes each, part of emoji flag sequences, and increasingly
stripped by prompt-injection "ASCII smuggling" filters); U+206A-206F
(deprecated formatting controls); Hangul fillers (render as blanks).
Known limitation: text that deliberately deletes zero-width characters (the
common JS idiom ``replace(/[\\u200B-\\u200D\\uFEFF]/g, "")`` or NFKC_Casefold,
which drops all default ignorables) destroys the mark; so would any
zero-width encoding with 8 symbols -- the conversation then simply restarts.

Layout
------
    START (2) | payload (64) | END (2)                     = 68 characters
    START = U+2060 U+2063,  END = U+2063 U+2060

START/END begin and end with a Grapheme_Cluster_Break=Control character (never
ZWJ/ZWNJ), so a mark never glues onto a neighbouring emoji or letter cluster,
and a mark is recognised anywhere in the text, several may coexist.  The
payload is 24 bytes = 192 bits = exactly 64 octal digits, big-endian:

    tag  = HMAC-SHA256(k_mac, version | len|app_id | len|client_id | uuid16)[:8]
    ct   = uuid16 XOR HMAC-SHA256(k_enc, len|app_id | len|client_id | tag)[:16]
    payload = ct (16 bytes) | tag (8 bytes)

i.e. a deterministic SIV-style authenticated encryption: the 16 raw UUID bytes
(not the 36-character text) are hidden from whoever reads or copies the text
(the original leaked them), and the 64-bit tag binds the mark to the secret,
the format version (also implied by START), the app and the client identity.
``k_mac``/``k_enc`` are derived from the secret with distinct labels.  Tags are
compared with ``hmac.compare_digest``.

Tag length: 64 bits.  There is no offline oracle (the key is server-side), so
an attacker can only submit guesses as requests: success probability 2^-64
(about 5.4e-20) per attempt -- a million attempts a second would take ~290 000
years for an even chance.  A corrupted, truncated, forged, other-app or
other-client mark is rejected with the same probability and never reaches Dify.

Measured length (asserted in tests/test_marks.py)
-------------------------------------------------
    MARK_LENGTH = 68 characters = 68 UTF-16 code units = 204 UTF-8 bytes
    (the original: 96 characters / 288 bytes, unauthenticated, id in clear).

Secret
------
``derive_secret(explicit, material)``: an explicitly configured secret is used
(passed through HKDF so any length works); otherwise the secret is derived with
HKDF-SHA256 under a fixed label from the sorted, de-duplicated configuration
material (Dify app keys and client keys).  Restarts and several instances with
the same configuration agree; no new mandatory setting; the result is none of
the keys.  Changing the material (adding or removing a key) invalidates older
marks (those conversations restart) -- configure an explicit secret to avoid
that.  With neither secret nor material a random per-process secret is used.

Placement
---------
Appending a mark directly after text can break markdown: a trailing URL would
absorb it into the autolink, a closing code fence / thematic break / link
definition would stop being one.  ``mark_suffix(answer, mark)`` returns the
separator plus the mark to append (at least one newline; a blank line after a
table row).  ``strip_marks`` removes only the mark, not that separator.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import uuid

__all__ = [
    "ALPHABET",
    "MARK_LENGTH",
    "derive_secret",
    "find_conversation",
    "has_mark_characters",
    "make_mark",
    "mark_suffix",
    "strip_marks",
]

ALPHABET = "\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064"
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}

START = "\u2060\u2063"
END = "\u2063\u2060"

_VERSION = b"\x01"
_UUID_BYTES = 16
_TAG_BYTES = 8
_PAYLOAD_BYTES = _UUID_BYTES + _TAG_BYTES
_PAYLOAD_CHARS = _PAYLOAD_BYTES * 8 // 3  # 64 octal digits
assert _PAYLOAD_CHARS * 3 == _PAYLOAD_BYTES * 8

MARK_LENGTH = len(START) + _PAYLOAD_CHARS + len(END)  # 68

# Verifying a candidate costs two HMACs; cap the work per content value so an
# adversarial history full of mark-shaped runs stays cheap.  Candidates are
# tried newest first, so only a client hiding its own valid mark behind this
# many invalid ones can lose it.
MAX_CANDIDATES = 64

_CLASS = "[" + ALPHABET + "]"
_ALPHA_RE = re.compile(_CLASS)
_MARK_RE = re.compile(re.escape(START) + _CLASS + "{%d}" % _PAYLOAD_CHARS + re.escape(END))
# Lookahead: finds overlapping candidates too (noise before a real mark must
# not hide it).
_CANDIDATE_RE = re.compile("(?=(" + _MARK_RE.pattern + "))")

_SECRET_LABEL = b"opendify/marks/secret/v1"


# --------------------------------------------------------------------------
# secret


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _field(s: str) -> bytes:
    b = _bytes(s)
    return len(b).to_bytes(4, "big") + b


def derive_secret(explicit: str | None, material: list[str]) -> bytes:
    """The 32-byte mark secret.

    ``explicit`` (a configured secret) wins when it is a non-empty string;
    otherwise the secret is derived from ``material`` (the server's Dify app
    keys and client keys; order and duplicates do not matter).  Deterministic,
    so restarts and instances with the same configuration agree.
    """
    if isinstance(explicit, str) and explicit.strip():
        return _hkdf(_bytes(explicit), _SECRET_LABEL, b"explicit")
    items = sorted({m for m in (material or []) if isinstance(m, str) and m})
    if not items:
        # Nothing to derive from: a deterministic constant would be public,
        # so fall back to a per-process secret (marks do not survive restart).
        return os.urandom(32)
    return _hkdf(b"".join(_field(m) for m in items), _SECRET_LABEL, b"derived")


@functools.lru_cache(maxsize=32)
def _subkeys(secret: bytes) -> tuple[bytes, bytes]:
    mac = hmac.new(secret, b"opendify/marks/v1/mac", hashlib.sha256).digest()
    enc = hmac.new(secret, b"opendify/marks/v1/enc", hashlib.sha256).digest()
    return mac, enc


def _tag(k_mac: bytes, binding: bytes, raw: bytes) -> bytes:
    return hmac.new(k_mac, _VERSION + binding + raw, hashlib.sha256).digest()[:_TAG_BYTES]


def _keystream(k_enc: bytes, binding: bytes, tag: bytes) -> bytes:
    return hmac.new(k_enc, binding + tag, hashlib.sha256).digest()[:_UUID_BYTES]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


# --------------------------------------------------------------------------
# writing


def make_mark(conversation_id: str, *, secret: bytes, app_id: str, client_id: str) -> str:
    """The invisible mark (MARK_LENGTH characters) for ``conversation_id``.

    Raises ValueError if ``conversation_id`` is not a UUID string.
    """
    if not isinstance(conversation_id, str):
        raise ValueError("conversation id must be a UUID string")
    try:
        raw = uuid.UUID(conversation_id.strip()).bytes
    except ValueError:
        raise ValueError("conversation id is not a UUID: %r" % (conversation_id[:64],)) from None
    if not isinstance(app_id, str) or not isinstance(client_id, str):
        raise TypeError("app_id and client_id must be str")
    k_mac, k_enc = _subkeys(bytes(secret))
    binding = _field(app_id) + _field(client_id)
    tag = _tag(k_mac, binding, raw)
    payload = _xor(raw, _keystream(k_enc, binding, tag)) + tag
    n = int.from_bytes(payload, "big")
    digits = []
    for _ in range(_PAYLOAD_CHARS):
        digits.append(ALPHABET[n & 7])
        n >>= 3
    return START + "".join(reversed(digits)) + END


def mark_suffix(answer: str, mark: str) -> str:
    """What to append to ``answer`` (the full reply text so far): separator + mark.

    The mark goes on its own line so it cannot extend a trailing URL, a closing
    code fence, a thematic break or a link definition; after a possible table
    row it needs a blank line (otherwise it would become an empty table row).
    """
    if not answer or not answer.strip():
        return mark
    body = answer.rstrip(" \t\r\n")
    trailing = answer[len(body):].count("\n")
    last_line = body.rsplit("\n", 1)[-1]
    need = 2 if "|" in last_line else 1
    return "\n" * max(0, need - trailing) + mark


# --------------------------------------------------------------------------
# reading


def has_mark_characters(text: str) -> bool:
    """True if ``text`` contains any alphabet character (cheap pre-check)."""
    return isinstance(text, str) and _ALPHA_RE.search(text) is not None


def strip_marks(text: str) -> str:
    """``text`` with every mark-shaped run (valid or not) removed.

    Only complete START + 64 alphabet characters + END runs are removed, so
    stray zero-width characters (e.g. the ZWJs of emoji sequences) stay.
    """
    if not has_mark_characters(text):
        return text
    return _MARK_RE.sub("", text)


def _decode(run: str, k_mac: bytes, k_enc: bytes, binding: bytes) -> str | None:
    n = 0
    for ch in run[len(START):len(START) + _PAYLOAD_CHARS]:
        n = (n << 3) | _INDEX[ch]
    payload = n.to_bytes(_PAYLOAD_BYTES, "big")
    ct, tag = payload[:_UUID_BYTES], payload[_UUID_BYTES:]
    raw = _xor(ct, _keystream(k_enc, binding, tag))
    if not hmac.compare_digest(_tag(k_mac, binding, raw), tag):
        return None
    return str(uuid.UUID(bytes=raw))


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts = []
    if isinstance(content, (list, tuple)):
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str) and part.get("type", "text") == "text":
                    texts.append(text)
    return texts


def find_conversation(content, *, secret: bytes, app_id: str, client_id: str) -> str | None:
    """Conversation id (lowercase canonical UUID) of the last valid mark in ``content``.

    ``content`` is a message's content: a str, None, or a list of OpenAI
    content parts (``{"type": "text", "text": ...}``).  Marks made with another
    secret, app or client, and corrupted or forged marks, are ignored.  Returns
    None when there is no valid mark; never raises on arbitrary content.
    """
    if not isinstance(app_id, str) or not isinstance(client_id, str):
        return None
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        return None
    texts = [t for t in _texts(content) if has_mark_characters(t)]
    if not texts:
        return None
    k_mac, k_enc = _subkeys(bytes(secret))
    binding = _field(app_id) + _field(client_id)
    budget = MAX_CANDIDATES
    for text in reversed(texts):
        candidates = [m.group(1) for m in _CANDIDATE_RE.finditer(text)]
        for run in reversed(candidates):
            if budget <= 0:
                return None
            budget -= 1
            found = _decode(run, k_mac, k_enc, binding)
            if found is not None:
                return found
    return None
