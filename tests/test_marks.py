import html
import json
import sys
import unicodedata
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import marks  # noqa: E402
from content import content_text  # noqa: E402
from marks import (  # noqa: E402
    MARK_LENGTH,
    MARK_V1_LENGTH,
    derive_secret,
    find_mark,
    fingerprint,
    has_mark_characters,
    make_mark,
    mark_placement,
    strip_marks,
)


def find_conversation(content, **kw):
    """The conversation a message's content (a string or parts) carries, read as the proxy reads it."""
    if isinstance(content, list):
        content = content_text(content, placeholders=False)
    found = find_mark(content, **kw)
    return found.conversation_id if found else None

SECRET = derive_secret(None, ["app-key-1", "app-key-2", "client-key-1"])
CID = "3f2b8c1e-9d4a-4b6f-8e2a-1c5d7f9a0b3e"
APP = "app-1"
CLIENT = "client-1"
KW = dict(secret=SECRET, app_id=APP, client_id=CLIENT)

# Unicode White_Space (PropList.txt)
WHITE_SPACE = set(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
ZS = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Zs"}
# ECMAScript String.prototype.trim: WhiteSpace (TAB, VT, FF, ZWNBSP, any Zs) + LineTerminator
JS_TRIM = {"\t", "\x0b", "\x0c", "\ufeff", "\n", "\r", "\u2028", "\u2029"} | ZS


def js_trim(s: str) -> str:
    i, j = 0, len(s)
    while i < j and s[i] in JS_TRIM:
        i += 1
    while j > i and s[j - 1] in JS_TRIM:
        j -= 1
    return s[i:j]


def mark(cid=CID, **kw):
    args = dict(KW)
    args.update(kw)
    return make_mark(cid, **args)


uuids = st.uuids().map(str)
ids = st.text(max_size=40)


# ---------------------------------------------------------------- alphabet


def test_alphabet_properties():
    assert len(set(marks.ALPHABET)) == 8
    for ch in marks.ALPHABET:
        assert unicodedata.category(ch) == "Cf"
        assert ch not in WHITE_SPACE and ch not in ZS
        assert ch not in JS_TRIM and ch not in ("\ufeff", "\u180e")
        assert not ch.isspace() and not ch.isprintable()
        assert ord(ch) < 0x10000
        for form in ("NFC", "NFD", "NFKC", "NFKD"):
            assert unicodedata.normalize(form, ch) == ch
        assert ch.strip() == ch and js_trim(ch) == ch
        assert unicodedata.bidirectional(ch) == "BN"
    # delimiters do not begin or end with a joiner
    assert marks.START[0] not in "\u200c\u200d" and marks.END[-1] not in "\u200c\u200d"


def test_length_measured():
    m = mark()
    assert MARK_V1_LENGTH == 68
    assert len(m) == MARK_V1_LENGTH
    assert len(m.encode("utf-16-le")) // 2 == 68
    assert len(m.encode("utf-8")) == 204
    assert set(m) <= set(marks.ALPHABET)
    assert m.startswith(marks.START) and m.endswith(marks.END)
    v2 = mark(message_id="msg-1")
    assert MARK_LENGTH == 90 and len(v2) == 90 and len(v2.encode("utf-16-le")) // 2 == 90
    assert len(v2.encode("utf-8")) == 270
    assert set(v2) <= set(marks.ALPHABET) and v2.startswith(marks.START2) and v2.endswith(marks.END2)


@settings(max_examples=100, deadline=None)
@given(cid=uuids, message=st.text(max_size=40), tools=st.text(max_size=40), client=ids)
def test_version_two_round_trip(cid, message, tools, client):
    tools_seen = fingerprint(SECRET, "tools", tools)
    m = make_mark(cid, secret=SECRET, app_id=APP, client_id=client, message_id=message, tools=tools_seen)
    found = find_mark("Hi." + m + "\n", secret=SECRET, app_id=APP, client_id=client)
    assert found.conversation_id == cid
    assert found.message == fingerprint(SECRET, "message", message) and found.tools == tools_seen
    assert find_mark(m, secret=SECRET, app_id=APP, client_id=client + "x") is None
    assert strip_marks("a" + m + "b") == "ab"


def test_version_two_fields_are_authenticated():
    m = mark(message_id="msg-1")
    assert find_mark(m, **KW).message == fingerprint(SECRET, "message", "msg-1")
    assert find_mark(m, **KW).tools == fingerprint(SECRET, "tools", "")
    for position in (2, 30, 50, 70, 87):  # ct, message, tools and tag digits
        digit = marks.ALPHABET[(marks.ALPHABET.index(m[position]) + 1) % 8]
        assert find_mark(m[:position] + digit + m[position + 1:], **KW) is None
    # the two padding bits of the first digit must be zero
    assert m[2] in marks.ALPHABET[:2]
    assert find_mark(m[:2] + marks.ALPHABET[marks.ALPHABET.index(m[2]) + 4] + m[3:], **KW) is None


def test_version_one_marks_from_before_still_read():
    old = mark()  # written without a message id: the version-1 format of earlier releases
    found = find_mark("Reply." + old, **KW)
    assert found == marks.Mark(CID) and found.message is None and found.tools is None
    assert find_mark(old + mark(str(uuid.UUID(int=7)), message_id="m"), **KW).conversation_id == str(uuid.UUID(int=7))


def test_mark_is_deterministic_and_hides_id():
    m = mark()
    assert m == mark()
    assert mark(cid=CID.upper()) == m
    assert mark(cid=CID.replace("-", "")) == m
    # the raw uuid bytes do not appear in the payload
    n = int("".join(str(marks.ALPHABET.index(c)) for c in m[2:-2]), 8)
    assert uuid.UUID(CID).bytes not in n.to_bytes(24, "big")


# ---------------------------------------------------------------- round trips


@settings(max_examples=200, deadline=None)
@given(cid=uuids, app=ids, client=ids)
def test_round_trip(cid, app, client):
    m = make_mark(cid, secret=SECRET, app_id=app, client_id=client)
    assert len(m) == MARK_V1_LENGTH
    assert find_conversation(m, secret=SECRET, app_id=app, client_id=client) == cid
    assert find_conversation("Hi.\n" + m, secret=SECRET, app_id=app, client_id=client) == cid


@settings(max_examples=100, deadline=None)
@given(cid=uuids, before=st.text(max_size=30), after=st.text(max_size=30))
def test_found_anywhere_and_strip_is_exact(cid, before, after):
    m = mark(cid)
    text = before + m + after
    assert find_conversation(text, **KW) == cid
    if not has_mark_characters(before + after):
        assert strip_marks(text) == before + after


TRANSFORMS = {
    "strip": str.strip,
    "js_trim": js_trim,
    "nfc": lambda s: unicodedata.normalize("NFC", s),
    "nfkc": lambda s: unicodedata.normalize("NFKC", s),
    "nfd": lambda s: unicodedata.normalize("NFD", s),
    "nfkd": lambda s: unicodedata.normalize("NFKD", s),
    "json_ascii": lambda s: json.loads(json.dumps(s)),
    "json_utf8": lambda s: json.loads(json.dumps(s, ensure_ascii=False)),
    "json_bytes": lambda s: json.loads(json.dumps({"c": s}, ensure_ascii=False).encode("utf-8"))["c"],
    "utf16": lambda s: s.encode("utf-16").decode("utf-16"),
    "utf16le": lambda s: s.encode("utf-16-le").decode("utf-16-le"),
    "utf8": lambda s: s.encode("utf-8").decode("utf-8"),
    "html": lambda s: html.unescape(html.escape(s)),
    "crlf": lambda s: s.replace("\n", "\r\n"),
    "rewrap_ws": lambda s: " ".join(s.split()),
    "pad": lambda s: "\ufeff \t\n" + s + "\u3000\u00a0\n\r ",
    "pad_then_trim": lambda s: js_trim("\ufeff  " + s + " \ufeff\n").strip(),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize(
    "template",
    ["{m}", "Answer text.{m}", "Answer text.\n{m}", "{m}Answer", "a {m} b", "  x\n\n{m}\n\n  "],
)
def test_survives_transforms(name, template):
    text = template.format(m=mark())
    out = TRANSFORMS[name](text)
    assert find_conversation(out, **KW) == CID
    # composed with all others
    for other in TRANSFORMS.values():
        assert find_conversation(other(out), **KW) == CID


@settings(max_examples=50, deadline=None)
@given(cid=uuids, ws=st.lists(st.sampled_from(sorted(JS_TRIM | WHITE_SPACE)), max_size=10))
def test_survives_whitespace_changes(cid, ws):
    w = "".join(ws)
    text = w + "hello" + w + mark(cid) + w
    for f in (str.strip, js_trim, str.lstrip, str.rstrip, lambda s: s.replace("\n", " ")):
        assert find_conversation(f(text), **KW) == cid


def test_list_content():
    m = mark()
    content = [
        {"type": "text", "text": "first part"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,xx" + m}},
        {"type": "text", "text": "second part" + m},
    ]
    assert find_conversation(content, **KW) == CID
    assert find_conversation(json.loads(json.dumps(content)), **KW) == CID
    # only non-text part carries it -> ignored
    assert find_conversation(content[:2], **KW) is None


# ---------------------------------------------------------------- rejection


def test_wrong_secret_app_client():
    m = mark()
    assert find_conversation(m, **KW) == CID
    other = derive_secret(None, ["app-key-1", "app-key-2", "client-key-2"])
    assert find_conversation(m, secret=other, app_id=APP, client_id=CLIENT) is None
    assert find_conversation(m, secret=SECRET, app_id="app-2", client_id=CLIENT) is None
    assert find_conversation(m, secret=SECRET, app_id=APP, client_id="client-2") is None
    assert find_conversation(m, secret=SECRET, app_id="", client_id="") is None
    # field boundaries are unambiguous
    m2 = make_mark(CID, secret=SECRET, app_id="ab", client_id="c")
    assert find_conversation(m2, secret=SECRET, app_id="a", client_id="bc") is None


@settings(max_examples=50, deadline=None)
@given(cid=uuids, app=ids, client=ids, app2=ids, client2=ids)
def test_binding_property(cid, app, client, app2, client2):
    m = make_mark(cid, secret=SECRET, app_id=app, client_id=client)
    got = find_conversation(m, secret=SECRET, app_id=app2, client_id=client2)
    assert got == (cid if (app, client) == (app2, client2) else None)


def test_every_single_corruption_rejected():
    m = mark()
    other_chars = marks.ALPHABET + "x \u200e\ufeff\u180e"
    seen = 0
    for i in range(len(m)):
        for c in other_chars:
            if c == m[i]:
                continue
            bad = m[:i] + c + m[i + 1:]
            assert find_conversation(bad, **KW) is None, (i, c)
            seen += 1
        # deletion
        assert find_conversation(m[:i] + m[i + 1:], **KW) is None, i
        # insertion strictly inside the mark (outside it is just surrounding text)
        for c in marks.ALPHABET + " \n":
            bad = m[:i] + c + m[i:]
            if m in bad:  # same string as an insertion next to the intact mark
                continue
            assert find_conversation(bad, **KW) is None, (i, c)
    for k in range(len(m)):
        assert find_conversation(m[:k], **KW) is None  # truncated end
        assert find_conversation(m[k + 1:], **KW) is None  # truncated start
    # adjacent transpositions
    for i in range(len(m) - 1):
        if m[i] != m[i + 1]:
            bad = m[:i] + m[i + 1] + m[i] + m[i + 2:]
            assert find_conversation(bad, **KW) is None, i
    assert seen > 68 * 8


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(list(marks.ALPHABET)),
            st.just(marks.START),
            st.just(marks.END),
            st.text(alphabet=marks.ALPHABET, min_size=64, max_size=64).map(
                lambda p: marks.START + p + marks.END
            ),
        ),
        max_size=40,
    )
)
def test_noise_never_valid(parts):
    text = "".join(parts)
    assert find_conversation(text, **KW) is None
    assert find_conversation([{"type": "text", "text": text}], **KW) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_valid_and_strip_is_noop(text):
    assert find_conversation(text, **KW) is None
    if marks.START not in text:
        assert strip_marks(text) == text


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.binary(), st.dictionaries(st.text(), st.text()),
                 st.lists(st.one_of(st.none(), st.integers(), st.text(),
                                    st.dictionaries(st.text(), st.one_of(st.text(), st.none()))))))
def test_never_raises(content):
    assert find_mark(content, **KW) is None


def test_garbage_arguments_do_not_raise():
    m = mark()
    assert find_conversation(m, secret=b"", app_id=APP, client_id=CLIENT) is None
    assert find_conversation(m, secret=None, app_id=APP, client_id=CLIENT) is None
    assert find_conversation(m, secret=SECRET, app_id=None, client_id=CLIENT) is None
    assert find_conversation("\ud800" + m + "\udfff", **KW) == CID


# ---------------------------------------------------------------- ordering


def test_last_valid_mark_wins():
    ids_ = [str(uuid.uuid4()) for _ in range(3)]
    text = "a" + mark(ids_[0]) + "b" + mark(ids_[1]) + "c" + mark(ids_[2]) + "d"
    assert find_conversation(text, **KW) == ids_[2]
    # a later invalid / foreign mark does not hide an earlier valid one
    foreign = mark(ids_[2], client_id="someone-else")
    assert find_conversation(mark(ids_[0]) + foreign, **KW) == ids_[0]
    corrupted = mark(ids_[2])
    corrupted = corrupted[:10] + marks.ALPHABET[(marks.ALPHABET.index(corrupted[10]) + 1) % 8] + corrupted[11:]
    assert find_conversation(mark(ids_[0]) + corrupted, **KW) == ids_[0]
    # noise glued in front of a valid mark does not hide it
    assert find_conversation(marks.START + "\u200b" * 20 + mark(ids_[1]), **KW) == ids_[1]
    # list parts: last part wins
    parts = [{"type": "text", "text": mark(i)} for i in ids_]
    assert find_conversation(parts, **KW) == ids_[2]


def test_candidate_budget_bounds_work():
    # pathological input: many shaped but invalid runs; must stay fast and give None
    junk = (marks.START + "\u200b" * 64 + marks.END) * 5000
    assert find_conversation(junk, **KW) is None
    assert find_conversation(mark() + junk[: MARK_LENGTH * 10], **KW) == CID


# ---------------------------------------------------------------- strip_marks


def test_strip_marks_keeps_other_text():
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    flag = "\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F"
    text = "x\u200by\u200cz\u2060w\u2061\u2062\u2063\u2064\ufeff " + family + flag + "\u0915\u094d\u200d"
    assert strip_marks(text) == text
    m = mark()
    assert strip_marks(family + m + family) == family + family
    assert strip_marks(family + m) == family
    assert strip_marks(m + family) == family
    assert strip_marks("a" + m + "b" + mark(client_id="other") + "c") == "abc"
    # shaped but invalid runs are removed too
    assert strip_marks("q" + marks.START + "\u200b" * 64 + marks.END + "r") == "qr"
    # incomplete runs are left alone
    assert strip_marks("q" + m[:-1] + "r") == "q" + m[:-1] + "r"
    assert strip_marks("") == ""


def test_has_mark_characters():
    assert not has_mark_characters("plain text, 中文, emoji \U0001F600")
    assert has_mark_characters("a\u200db")
    assert has_mark_characters(mark())
    assert not has_mark_characters(None)


# ---------------------------------------------------------------- make_mark / secret


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "3f2b8c1e-9d4a-4b6f-8e2a", None, 123])
def test_make_mark_rejects_non_uuid(bad):
    with pytest.raises(ValueError):
        make_mark(bad, **KW)


def test_derive_secret():
    a = derive_secret(None, ["k2", "k1", "k3"])
    assert a == derive_secret(None, ["k1", "k3", "k2", "k1"])  # order / duplicates
    assert len(a) == 32
    assert a != derive_secret(None, ["k1", "k2"])
    assert a != derive_secret(None, ["k1k2", "k3"])
    for k in ("k1", "k2", "k3"):
        assert k.encode() not in a
    e = derive_secret("my secret", ["k1"])
    assert e == derive_secret("my secret", ["other"]) and e != a and len(e) == 32
    assert derive_secret("", ["k2", "k1", "k3"]) == a
    assert derive_secret(None, []) != derive_secret(None, [])  # random fallback
    # a mark made by one "instance" is read by another with the same config
    m = make_mark(CID, secret=derive_secret(None, ["k1", "k2"]), app_id=APP, client_id=CLIENT)
    assert find_conversation(m, secret=derive_secret(None, ["k2", "k1"]), app_id=APP, client_id=CLIENT) == CID


# ---------------------------------------------------------------- placement


@pytest.mark.parametrize(
    "answer,placement",
    [
        ("", "inline"),
        ("Hello.", "inline"),
        ("Hello.\n\n", "inline"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "inline"),
        ("See [the docs](https://example.com)", "inline"),
        ("![chart](/files/chart.png)", "inline"),
        ("Link: <https://example.com>", "inline"),
        ("See https://example.com", "own-line"),
        ("(see https://example.com).", "own-line"),
        ("Write to ann@example.com", "own-line"),
        ("```py\nx = 1\n```", "own-line"),
        ("~~~\ncode\n~~~\n", "own-line"),
        ("Text\n\n---", "own-line"),
        ("Title\n=====", "own-line"),
        ("[ref]: /docs", "own-line"),
    ],
)
def test_mark_placement(answer, placement):
    assert mark_placement(answer) == placement
