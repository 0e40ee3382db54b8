"""tool_calls.py: calls found in the answer as it streams, content released at once, the holdback bounded."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tool_calls import MAX_HOLDBACK, ToolCallParser
from tool_samples import REQ, SERIAL, call_args, envelope, ids, parse, stream, streamed

ENVELOPE_MARKS = ("<tool_call", "</tool_call", "tool_call>", '"arguments"', "```json")


FORMS = {
    "own envelope": envelope("get_weather", {"city": "Paris"}),
    "hermes inline": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "arguments as string": '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
    "parameters synonym": '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>',
    "attributes": '<tool_call id="call_old">{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "plural tag list": '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>',
    "openai shape in tag": '<tool_call>{"type": "function", "function": {"name": "get_weather", '
                           '"arguments": "{\\"city\\":\\"Paris\\"}"}}</tool_call>',
    "fenced call": '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    "bare fence": '```\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n',
    "fenced list": '```json\n[{"name": "get_weather", "arguments": {"city": "Paris"}}]\n```',
    "fenced HAN": '```json\n{"tool_calls": [{"id": "call_x", "type": "function", "function": '
                  '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]}\n```',
    "fenced tags": '```xml\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n```',
    "fence inside tag": '<tool_call>\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n</tool_call>',
    "prefixed name": '<tool_call>{"name": "functions.get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "missing close tag": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "upper case tag": '<TOOL_CALL>{"name": "get_weather", "arguments": {"city": "Paris"}}</TOOL_CALL>',
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_recognised_forms(name):
    text = "Let me check.\n" + FORMS[name]
    content, calls = parse(text)
    assert content == "Let me check.\n"
    assert call_args(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0]["type"] == "function" and calls[0]["id"] == "call_" + "0" * 24


@pytest.mark.parametrize("name", sorted(FORMS))
def test_forms_stream_one_char_at_a_time(name):
    text = "Let me check.\n" + FORMS[name] + "\n\n"
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)
    shown = "".join(v for k, v in pieces if k == "content")
    assert not any(mark in shown for mark in ENVELOPE_MARKS)
    assert "`" not in shown


def test_call_alone_has_null_content():
    assert parse("\n\n" + envelope("now", {}) + "\n  ") == (None, [
        {"id": "call_" + "0" * 24, "type": "function", "function": {"name": "now", "arguments": "{}"}}])


def test_several_calls_distinct_indexes_and_ids():
    text = "I'll do both.\n" + envelope("get_weather", {"city": "Paris"}) + "\n" + envelope("search", {"query": "x"}) \
        + '\n<tool_call>{"name": "now"}'
    parser = ToolCallParser(REQ)
    pieces = parser.feed(text) + parser.finish()
    calls = [c for k, c in pieces if k == "tool_call"]
    assert [c["index"] for c in calls] == [0, 1, 2]
    assert len({c["id"] for c in calls}) == 3
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 and c["id"][5:].isalnum() for c in calls)
    assert [c["name"] for c in calls] == ["get_weather", "search", "now"]
    assert parser.called


def test_duplicate_ids_from_factory_are_made_distinct():
    parser = ToolCallParser(REQ, id_factory=lambda: "call_same")
    pieces = parser.feed(envelope("now", {}) + envelope("now", {})) + parser.finish()
    assert len({c["id"] for k, c in pieces if k == "tool_call"}) == 2


def test_calls_are_emitted_as_soon_as_closed():
    parser = ToolCallParser(REQ, id_factory=ids())
    assert parser.feed("Checking.\n<tool_call>\n") == [("content", "Checking.\n")]
    assert parser.feed('{"name": "now", "arguments": {}}\n') == []
    pieces = parser.feed("</tool_call>")
    assert pieces == [("tool_call", {"index": 0, "id": "call_" + "0" * 24, "name": "now", "arguments": "{}"})]
    assert parser.finish() == []


def test_text_before_and_after_calls():
    content, calls = parse("Sure:\n" + envelope("now", {}) + "\n\nThen I will summarise.")
    assert content == "Sure:\n\n\nThen I will summarise."
    assert len(calls) == 1
    assert parse("Sure:" + envelope("now", {}) + "   \n")[0] == "Sure:"


def test_parallel_false_keeps_only_the_first_call():
    content, calls = parse(envelope("now", {}) + "\n" + envelope("search", {"query": "q"}), SERIAL)
    assert content is None and call_args(calls) == [("now", {})]


def test_hallucinated_result_after_a_call_is_dropped():
    text = envelope("now", {}) + '\n<tool_result name="now">\n12:00\n</tool_result>\nIt is noon.'
    assert parse(text)[0] is None
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


def test_stray_close_tag_after_call_is_dropped():
    content, calls = parse('<tool_call>{"name": "now"}</tool_call></tool_call>\nDone.')
    assert content == "\nDone." and len(calls) == 1


def test_missing_close_tag_before_next_call():
    text = '<tool_call>{"name": "now"}\n<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>'
    assert call_args(parse(text)[1]) == [("now", {}), ("search", {"query": "a"})]


@pytest.mark.parametrize("steps", [
    [("Hello, world. a < b, <div> and x<y", "Hello, world. a < b, <div> and x<y"), (" see <to", " see "),
     ("p>", "<top>"), ("\n``", "\n"), ("`python\n", "```python\n")],
    [("Run:\n```\nnpm install\n", "Run:\n```\nnpm install\n"), ("```\n", "```\n"),
     ("```xml\n<root/>", "```xml\n<root/>"), ("\n```\nWrite <tool_call> then", "\n```\nWrite <tool_call> then"),
     (" JSON.\n```json\n", " JSON.\n"), ('"just a string"', '```json\n"just a string"')],
], ids=["tag-like text", "code blocks and tag mentions"])
def test_text_that_cannot_be_a_call_is_not_held(steps):
    """Each chunk fed shows at once all that cannot start a call."""
    parser = ToolCallParser(REQ)
    for chunk, shown in steps:
        assert parser.feed(chunk) == [("content", shown)]
    assert parser.finish() == [] and not parser.called


def test_wrapper_tag_around_calls():
    text = "<tool_calls>\n" + envelope("now", {}) + "\n" + envelope("search", {"query": "q"}) + "\n</tool_calls>\n"
    assert parse(text) == (None, parse(envelope("now", {}) + envelope("search", {"query": "q"}))[1])
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


def test_unclosed_envelope_followed_by_text():
    text = 'Ok.\n<tool_call>{"name": "now", "arguments": {}}\nI am waiting for the time.'
    content, calls = parse(text)
    assert content == "Ok.\n\nI am waiting for the time." and call_args(calls) == [("now", {})]


def test_plain_answer_passes_through_verbatim():
    text = "  Indented start.\n\n```python\nprint('<b>')\n```\n\nEnd with spaces  \n"
    assert parse(text) == (text, [])
    _, pieces = stream(text)
    assert streamed(pieces) == (text, [])


INVALID_ENVELOPES = [
    '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',
    '<tool_call>not json at all</tool_call>',
    '<tool_call>{"name": "get_weather", "description": "x", "parameters": {"type": "object"}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": ["a", "b"]}</tool_call>',
    '<tool_call></tool_call>',
]
BROKEN_ENDS = [
    '<tool_call>{"name": "search", "arguments": {"query": "weather in Par',
    '<tool_call>{"name": "sea',
    "<tool_call",
    "<tool_call>",
    '<tool_call id="x',
    '```json\n{"name": "search", "arguments": {"query": "cut',
    "```js",
    "\n``",
]


@pytest.mark.parametrize("text", ["Before. " + envelope + " After." for envelope in INVALID_ENVELOPES]
                         + ["Partial answer. " + tail for tail in BROKEN_ENDS])
def test_invalid_envelopes_and_broken_ones_at_the_end_stay_text(text):
    assert parse(text) == (text, [])
    parser, pieces = stream(text)
    assert streamed(pieces) == (text, []) and not parser.called


def test_fenced_non_call_json_stays_content():
    text = 'Here is the JSON you asked for:\n```json\n{"name": "Alice", "age": 30}\n```\nAnything else?'
    assert parse(text) == (text, [])
    parser = ToolCallParser(REQ)
    out = parser.feed('Here is the JSON you asked for:\n```json\n{"name": "Alice",')
    assert out == [("content", "Here is the JSON you asked for:\n")]
    assert parser.feed(' "age": 30}\n') == []
    assert parser.feed("```\nAny") == [("content", '```json\n{"name": "Alice", "age": 30}\n```\nAny')]


def test_tool_definition_in_fence_is_not_a_call():
    text = '```json\n{"name": "get_weather", "description": "Get the weather", "parameters": {}}\n```'
    assert parse(text) == (text, [])


def test_code_block_closing_fence_is_not_an_opening():
    text = "```python\nprint(1)\n```\n" + envelope("now", {})
    content, calls = parse(text)
    assert content == "```python\nprint(1)\n```\n" and len(calls) == 1
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


SAMPLES = [
    "Plain answer with <b>html</b> and `code` and\n```js\nx < y\n```\n",
    "Let me look.\n\n" + envelope("get_weather", {"city": "Paris", "days": "2"}) + "\n",
    envelope("now", {}) + envelope("search", {"query": "</tool"}),
    'Here:\n```json\n{"name": "search", "arguments": {"query": "q"}}\n```\nand ```json\n{"a": 1}\n```\n',
    '```json\n{"a": [1, 2,\n```\ntext <tool_call>{"name": "nope"}</tool_call> more',
    "<tool_call>" + envelope("now", {})[11:] + "</tool_call>trailing",
    "Two: " + envelope("now", {}) + "\n" + envelope("now", {}) + "\n<tool_result>x</tool_result>",
    "\n   \n" + '<tool_call>{"name": "get_weather", "arguments": {"city": "A"',
    "x <tool_calls\n>[]</tool_calls> y <tool_call attr='1'>{\"name\": \"now\"}</tool_call>",
    "   ```\n" + '{"name": "now"}' + "\n   ```   \nok",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_one_char_at_a_time_matches(text):
    parser, pieces = stream(text)
    assert streamed(pieces) == parse(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_every_split_point_matches(text):
    expected = parse(text)
    for i in range(len(text) + 1):
        assert streamed(stream([text[:i], text[i:]])[1]) == expected, i


def chunkings(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0] + points + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES + list(FORMS.values())), st.lists(st.integers(0, 10_000), max_size=30))
def test_random_chunkings_of_samples(text, cuts):
    assert streamed(stream(chunkings(text, cuts))[1]) == parse(text)


CALLS = st.one_of(
    st.builds(lambda q: ("search", {"query": q}), st.text(alphabet="ab <>{}\"'`\n\\", max_size=8)),
    st.builds(lambda c, d: ("get_weather", {"city": c, "days": d}), st.text(alphabet="xyz é", max_size=5),
              st.integers(0, 99)),
    st.just(("now", {})),
)
FORM_WRITERS = [
    lambda n, a: envelope(n, a),
    lambda n, a: "<tool_call>" + json.dumps({"name": n, "arguments": a}) + "</tool_call>",
    lambda n, a: "<tool_call>" + json.dumps({"name": n, "arguments": json.dumps(a)}) + "</tool_call>",
    lambda n, a: "\n```json\n" + json.dumps({"name": n, "arguments": a}) + "\n```\n",
    lambda n, a: "\n```\n" + json.dumps([{"name": n, "arguments": a}]) + "\n```\n",
    lambda n, a: "<tool_calls>" + json.dumps([{"name": n, "parameters": a}]) + "</tool_calls>",
]
TEXTS = st.text(alphabet="ab .<>/{}\n\"`", max_size=12).filter(lambda t: "``" not in t)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(TEXTS, CALLS, st.integers(0, len(FORM_WRITERS) - 1)), max_size=4), TEXTS,
       st.lists(st.integers(0, 10_000), max_size=20))
def test_generated_replies(segments, tail, cuts):
    text = "".join(t + FORM_WRITERS[f](n, a) for t, (n, a), f in segments) + tail
    expected = parse(text)
    parser, pieces = stream(chunkings(text, cuts))
    assert streamed(pieces) == expected
    content, calls = expected
    assert call_args(calls) == [(n, a) for _, (n, a), _ in segments]
    assert [c["id"] for c in calls] == ["call_%024d" % i for i in range(len(calls))]
    shown = content or ""
    plain = "".join(t for t, _, _ in segments) + tail
    assert "".join(shown.split()) == "".join(plain.split())
    if segments:
        assert "<tool_call" not in shown and '"arguments"' not in shown and '"parameters"' not in shown


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<", "tool_call", "tool_calls", "tool_result", ">", "</", "`", "```", "json",
                                  "\n", "  ", "{", "}", '"name"', ":", '"now"', ",", " x", "[", "]"]), max_size=40),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_adversarial_text_streams_like_one_shot(pieces, cuts):
    text = "".join(pieces)
    assert streamed(stream(chunkings(text, cuts))[1]) == parse(text)


def max_held(text, request=REQ):
    """The most characters the parser held undecided (not counting an open envelope) while `text`
    was fed one character at a time. The bound is internal, so this reads the parser's buffers."""
    parser = ToolCallParser(request)
    worst = 0
    for ch in text:
        parser.feed(ch)
        worst = max(worst, len(parser._ws) + len(parser._hold))
    parser.finish()
    return worst


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<", "tool_call", "tool_calls", "tool_result", "/", ">", " ", "\n", "\t", "`",
                                  "json", 'id="', "x", "\"", "{}"]), max_size=60).map("".join))
def test_holdback_is_bounded(text):
    assert max_held(text) <= MAX_HOLDBACK
    assert max_held(envelope("now", {}) + text) <= MAX_HOLDBACK


def test_holdback_measured():
    assert MAX_HOLDBACK == 79
    assert max_held("Hi <tool_calls") == 11
    assert max_held(envelope("now", {}) + "</tool_calls") == 12
    assert max_held("x\n   ```tool_calls  \r") == 19
    assert max_held("x\n   ```tool_calls" + " " * 7 + "\r") == 24  # FENCE_LINE_MAX
    assert max_held("x\n   ```tool_calls" + " " * 20) == 24
    assert max_held(" " * 16 + "<tool_call " + "a" * 51) == 16 + 62
    assert max_held(" " * 16 + "<tool_call " + "a" * 52) == MAX_HOLDBACK
    assert max_held(" " * 16 + "<tool_call " + "a" * 60) == MAX_HOLDBACK
    assert max_held("Ordinary prose, with punctuation; no tags at all.\nSecond line.") == 0


def test_feed_is_linear():
    text = ("Some ordinary text with a < sign and `code`.\n" * 2000)
    parser = ToolCallParser(REQ)
    started = time.perf_counter()
    out = [parser.feed(ch) for ch in text]
    parser.finish()
    elapsed = time.perf_counter() - started
    assert "".join(v for pieces in out for _, v in pieces) == text
    assert elapsed < 5


def test_long_envelope_streams_in_linear_time():
    arguments = {"query": "q" * 100_000}
    text = envelope("search", arguments)
    started = time.perf_counter()
    _, pieces = stream([text[i:i + 7] for i in range(0, len(text), 7)])
    assert time.perf_counter() - started < 5
    assert call_args(streamed(pieces)[1]) == [("search", arguments)]
