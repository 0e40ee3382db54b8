"""Invisible conversation marks for memory mode 2.

In memory mode 2 the proxy hides the Dify conversation id inside the assistant
reply and reads it back from the history the client resends.  This module is
the encoding: ``make_mark`` builds a mark, ``find_mark`` finds the newest
valid one in a resent reply's text, ``strip_marks`` removes mark-shaped runs so
histories can be compared and text shown clean, ``mark_placement`` says where
a mark can go without changing how the reply renders.

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
Version 2 (written since the mark also tells whether it sits on the conversation's newest
Dify message, and which tool catalogue the conversation was given):

    START2 (2) | payload (86) | END2 (2)                   = 90 characters
    START2 = U+2060 U+2064,  END2 = U+2064 U+2060

Version 1 (written before; still read, and written when Dify named no message):

    START (2) | payload (64) | END (2)                     = 68 characters
    START = U+2060 U+2063,  END = U+2063 U+2060

START/END begin and end with a Grapheme_Cluster_Break=Control character (never
ZWJ/ZWNJ), so a mark never glues onto a neighbouring emoji or letter cluster,
and a mark is recognised anywhere in the text, several may coexist.  The
version-1 payload is 24 bytes = 192 bits = exactly 64 octal digits, big-endian:

    tag  = HMAC-SHA256(k_mac, version | len|app_id | len|client_id | uuid16)[:8]
    ct   = uuid16 XOR HMAC-SHA256(k_enc, len|app_id | len|client_id | tag)[:16]
    payload = ct (16 bytes) | tag (8 bytes)

Version 2 adds two 4-byte keyed fingerprints (HMAC-SHA256 under a third subkey, so they reveal
nothing): of the Dify message id the mark sits on, and of the tool catalogue the conversation
was last given.  They sit in the clear between ct and tag and are covered by the tag:

    tag  = HMAC-SHA256(k_mac, 0x02 | len|app_id | len|client_id | uuid16 | message4 | tools4)[:8]
    payload = ct (16 bytes) | message4 | tools4 | tag (8) = 32 bytes = 256 bits
            = 86 octal digits (258 bits, the top two always zero)

Either version is a deterministic SIV-style authenticated encryption: the 16 raw UUID bytes
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
    MARK_LENGTH = 90 characters = 90 UTF-16 code units = 270 UTF-8 bytes (version 2)
    MARK_V1_LENGTH = 68 characters = 204 UTF-8 bytes
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
The mark is attached to the end of the reply's last line, before any trailing
whitespace, so it adds no line and the visible text ends exactly as Dify's answer
did (a mark on its own line renders as an empty line in chat UIs).  Where text
appended to the last line would change how it renders, the mark goes on a line
of its own instead: a last line that ends in a bare URL or e-mail address
(autolinks would absorb it), a code fence, a thematic break or setext underline,
or a link reference definition.  ``mark_placement(answer)`` says which;
``strip_marks`` removes only the mark.
"""

import functools
import hashlib
import hmac
import os
import re
import uuid
from dataclasses import dataclass

ALPHABET = "\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064"
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}

START = "\u2060\u2063"
END = "\u2063\u2060"
START2 = "\u2060\u2064"
END2 = "\u2064\u2060"

_UUID_BYTES = 16
_TAG_BYTES = 8
_FINGERPRINT_BYTES = 4


@dataclass(frozen=True)
class _Format:
    """One mark version's layout: its version byte, delimiters and the fingerprint bytes it adds."""
    version: bytes
    start: str
    end: str
    extra_bytes: int  # fingerprints between ct and tag

    @property
    def payload_bytes(self):
        return _UUID_BYTES + self.extra_bytes + _TAG_BYTES

    @property
    def payload_chars(self):
        return -(-self.payload_bytes * 8 // 3)

    @property
    def length(self):
        return len(self.start) + self.payload_chars + len(self.end)


_V1 = _Format(b"\x01", START, END, 0)
_V2 = _Format(b"\x02", START2, END2, 2 * _FINGERPRINT_BYTES)
_FORMATS = {START: _V1, START2: _V2}

MARK_LENGTH = _V2.length  # 90
MARK_V1_LENGTH = _V1.length  # 68

# Verifying a candidate costs two HMACs; cap the work per reply so an
# adversarial history full of mark-shaped runs stays cheap.  Candidates are
# tried newest first, so only a client hiding its own valid mark behind this
# many invalid ones can lose it.
MAX_CANDIDATES = 64

_CLASS = "[" + ALPHABET + "]"
_ALPHA_RE = re.compile(_CLASS)
_MARK_RE = re.compile("|".join(re.escape(f.start) + _CLASS + "{%d}" % f.payload_chars + re.escape(f.end)
                               for f in (_V1, _V2)))
# Lookahead: finds overlapping candidates too (noise before a real mark must
# not hide it).
_CANDIDATE_RE = re.compile("(?=(" + _MARK_RE.pattern + "))")


@dataclass(frozen=True)
class Mark:
    """What a valid mark says. `message` and `tools` are fingerprints (see `fingerprint`) of the Dify
    message the mark sits on and of the tool catalogue the conversation was last given; a version-1
    mark has neither (None)."""
    conversation_id: str
    message: bytes | None = None
    tools: bytes | None = None


_SECRET_LABEL = b"opendify/marks/secret/v1"


def _hkdf(ikm, salt, info, length=32):
    """HKDF-SHA256 (RFC 5869)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _bytes(s):
    return s.encode("utf-8", "surrogatepass")


def _field(s):
    b = _bytes(s)
    return len(b).to_bytes(4, "big") + b


def derive_secret(explicit, material):
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
def _subkeys(secret):
    mac = hmac.new(secret, b"opendify/marks/v1/mac", hashlib.sha256).digest()
    enc = hmac.new(secret, b"opendify/marks/v1/enc", hashlib.sha256).digest()
    fingerprints = hmac.new(secret, b"opendify/marks/v2/fingerprint", hashlib.sha256).digest()
    return mac, enc, fingerprints


def fingerprint(secret, kind, value):
    """A 4-byte keyed fingerprint of `value` (a Dify message id, a tool catalogue) for a mark to carry."""
    key = _subkeys(bytes(secret))[2]
    return hmac.new(key, _field(kind) + _field(value), hashlib.sha256).digest()[:_FINGERPRINT_BYTES]


def _tag(k_mac, fmt, binding, raw):
    return hmac.new(k_mac, fmt.version + binding + raw, hashlib.sha256).digest()[:_TAG_BYTES]


def _keystream(k_enc, binding, tag):
    return hmac.new(k_enc, binding + tag, hashlib.sha256).digest()[:_UUID_BYTES]


def _xor(a, b):
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def make_mark(conversation_id, *, secret, app_id, client_id, message_id=None, tools=None):
    """The invisible mark for ``conversation_id``: version 2 (MARK_LENGTH characters) carrying
    the fingerprint of ``message_id`` (the Dify message the mark will sit on) and ``tools`` (the
    fingerprint of the tool catalogue the conversation has been given; None: none); version 1
    (MARK_V1_LENGTH) when Dify named no message.

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
    k_mac, k_enc, _ = _subkeys(bytes(secret))
    binding = _field(app_id) + _field(client_id)
    fmt, extra = _V1, b""
    if message_id is not None:
        fmt = _V2
        extra = fingerprint(secret, "message", str(message_id)) + (tools or fingerprint(secret, "tools", ""))
    tag = _tag(k_mac, fmt, binding, raw + extra)
    payload = _xor(raw, _keystream(k_enc, binding, tag)) + extra + tag
    n = int.from_bytes(payload, "big")
    digits = []
    for _ in range(fmt.payload_chars):
        digits.append(ALPHABET[n & 7])
        n >>= 3
    return fmt.start + "".join(reversed(digits)) + fmt.end


_FENCE_LINE = re.compile(r" {0,3}(`{3,}|~{3,})[^`]*\Z")
_BREAK_LINE = re.compile(r" {0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,}|=+[ \t]*)\Z")
_MARKDOWN_LINK_END = re.compile(r"\]\([^()\s]*\)\Z")
_LINK_DEFINITION = re.compile(r" {0,3}\[[^\]]+\]:")
_BARE_ADDRESS = re.compile(r"(?:[a-z][a-z0-9+.-]*://|www\.|mailto:)[^\s<>]*\Z|[^\s<>()@]+@[^\s<>()@]+\.\w+\Z", re.I)


def mark_placement(answer):
    """Where the mark goes: "inline" (attached to the end of the last line, before any trailing
    whitespace) or "own-line" (after a newline), when the last line is one that appended text
    would change: a code fence, a thematic break or setext underline, a link reference
    definition, or a line ending in a bare URL or e-mail address that an autolink would extend."""
    body = answer.rstrip()
    if not body:
        return "inline"
    last_line = body.rsplit("\n", 1)[-1]
    if _FENCE_LINE.match(last_line) or _BREAK_LINE.match(last_line) or _LINK_DEFINITION.match(last_line):
        return "own-line"
    token = last_line.split()[-1]
    if not _MARKDOWN_LINK_END.search(token) and _BARE_ADDRESS.search(token.rstrip(".,:;!?*_~)'\"")):
        return "own-line"
    return "inline"


def has_mark_characters(text):
    """True if ``text`` contains any alphabet character (cheap pre-check)."""
    return isinstance(text, str) and _ALPHA_RE.search(text) is not None


def strip_marks(text):
    """``text`` with every mark-shaped run (valid or not) removed.

    Only complete START + 64 alphabet characters + END runs are removed, so
    stray zero-width characters (e.g. the ZWJs of emoji sequences) stay.
    """
    if not has_mark_characters(text):
        return text
    return _MARK_RE.sub("", text)


def _decode(run, k_mac, k_enc, binding):
    fmt = _FORMATS[run[:2]]
    n = 0
    for ch in run[2:2 + fmt.payload_chars]:
        n = (n << 3) | _INDEX[ch]
    if n >> (fmt.payload_bytes * 8):
        return None  # padding bits set: not a mark this module wrote
    payload = n.to_bytes(fmt.payload_bytes, "big")
    ct, extra, tag = payload[:_UUID_BYTES], payload[_UUID_BYTES:-_TAG_BYTES], payload[-_TAG_BYTES:]
    raw = _xor(ct, _keystream(k_enc, binding, tag))
    if not hmac.compare_digest(_tag(k_mac, fmt, binding, raw + extra), tag):
        return None
    conversation_id = str(uuid.UUID(bytes=raw))
    if not extra:
        return Mark(conversation_id)
    return Mark(conversation_id, extra[:_FINGERPRINT_BYTES], extra[_FINGERPRINT_BYTES:])


def find_mark(text, *, secret, app_id, client_id):
    """The last valid mark in ``text`` (its conversation id a lowercase canonical UUID).

    ``text`` is what the client resent of a reply (content.content_text without placeholders).
    Marks made with another secret, app or client, and corrupted or forged marks, are ignored.
    Returns None when there is no valid mark; never raises on arbitrary input.
    """
    if not isinstance(app_id, str) or not isinstance(client_id, str):
        return None
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        return None
    if not has_mark_characters(text):
        return None
    k_mac, k_enc, _ = _subkeys(bytes(secret))
    binding = _field(app_id) + _field(client_id)
    candidates = [m.group(1) for m in _CANDIDATE_RE.finditer(text)]
    for run in reversed(candidates[-MAX_CANDIDATES:]):
        found = _decode(run, k_mac, k_enc, binding)
        if found is not None:
            return found
    return None
