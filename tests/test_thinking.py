"""The thinking splitter: `<think>` and Dify's "Thinking..." details blocks split from answer text,
however the text is chunked."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pieces import CONTENT, REASONING
from support import merged
from thinking import ThinkSplitter


def split(chunks):
    splitter = ThinkSplitter()
    pieces = []
    for chunk in chunks:
        pieces.extend(splitter.feed(chunk))
    return merged(pieces + splitter.flush())


R1_ANSWER = "<think>\nThe user greets me.\n\nI greet back.\n</think>\n\nHello! <b>Welcome</b>."
DETAILS_ANSWER = ('<details style="color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;" open> '
                  "<summary> Thinking... </summary>\nThe user greets me.\n</details>\nHello!")


def test_think_block_becomes_reasoning_and_the_answer_is_trimmed():
    assert split([R1_ANSWER]) == [(REASONING, "The user greets me.\n\nI greet back."),
                                  (CONTENT, "Hello! <b>Welcome</b>.")]


def test_dify_thinking_details_block_becomes_reasoning():
    assert split([DETAILS_ANSWER]) == [(REASONING, "The user greets me."), (CONTENT, "Hello!")]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_split(data):
    text = data.draw(st.sampled_from([R1_ANSWER, DETAILS_ANSWER, "x <think> y\n<thinking> z",
                                      "a\n<details><summary>More</summary>b</details>"]))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=12)))
    chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    assert split(chunks) == split([text])


def test_only_a_possible_tag_prefix_is_held_back():
    splitter = ThinkSplitter()
    assert splitter.feed("Hello <thi") == [(CONTENT, "Hello <thi")]  # not at a line start: never a tag
    splitter = ThinkSplitter()
    assert splitter.feed("Plain text\n<thi") == [(CONTENT, "Plain text\n")]
    assert splitter.feed("s is html") == [(CONTENT, "<this is html")]
    splitter = ThinkSplitter()
    assert splitter.feed("<think>Deep thought </th") == [(REASONING, "Deep thought")]
    assert splitter.feed("ink>Done") == [(CONTENT, "Done")]


def test_mentions_of_the_tags_inside_lines_stay_text():
    text = "Wrap reasoning in `<think>` tags, e.g. a <think> b </think>."
    assert split([text]) == [(CONTENT, text)]


def test_other_details_blocks_stay_text():
    text = "<details><summary>Sources</summary>\n1. a\n</details>\nDone"
    assert split([text]) == [(CONTENT, text)]


def test_unfinished_tags_are_released_at_the_end():
    assert split(["Answer\n<thi"]) == [(CONTENT, "Answer\n<thi")]
    assert split(["<think>never closed"]) == [(REASONING, "never closed")]
