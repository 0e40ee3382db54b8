"""An agent round's tools, inputs and observations read into lines a person reads."""

import json

from agent_work import describe_arguments, summarise, tool_uses


def test_summarise_collapses_whitespace_and_cuts_at_a_word():
    assert summarise("  a\n\n b\t c ", 50) == "a b c"
    long = " ".join(["word"] * 100)
    short = summarise(long, 40)
    assert short.startswith("word word") and len(short) < 70
    assert short.endswith("more characters)") and f"({len(long) - 39} more" in short


def test_tool_uses_per_tool_with_labels_inputs_and_observations():
    thought = {"tool": "google_search;weather", "tool_labels": {"google_search": {"en_US": "Google Search"}},
               "tool_input": json.dumps({"google_search": {"query": "Paris"}, "weather": {"city": "Paris", "days": 2}}),
               "observation": json.dumps({"google_search": "Paris is the capital " * 100, "weather": {"temp": 18}})}
    (search, search_input, search_result), (weather, weather_input, weather_result) = tool_uses(thought)
    assert (search, search_input) == ("Google Search", "query: Paris")
    assert len(search_result) < 600 and search_result.endswith("more characters)")
    assert (weather, weather_input, weather_result) == ("weather", "city: Paris, days: 2", '{"temp": 18}')


def test_tool_uses_before_the_tool_ran_and_without_tools():
    assert tool_uses({"tool": "dalle3", "tool_input": '{"dalle3": {"prompt": "a cat"}}', "observation": ""}) == [
        ("dalle3", "prompt: a cat", None)]
    assert tool_uses({"tool": "", "thought": "just text"}) == []
    assert tool_uses({"tool": "calc", "tool_input": "1+1", "observation": "2"}) == [("calc", "1+1", "2")]


def test_describe_arguments():
    assert describe_arguments({"q": "x", "n": 3, "opts": {"a": True}}) == 'q: x, n: 3, opts: {"a": true}'
    assert describe_arguments("") == "" and describe_arguments([1, 2]) == "[1, 2]"
