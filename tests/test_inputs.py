"""inputs.py: an app's input form applied to a request's `inputs`."""

import pytest

from errors import APIError
from inputs import check_inputs, form_variables, text_variable

FORM = {"user_input_form": [
    {"text-input": {"label": "City", "variable": "city", "required": True, "max_length": 10, "default": ""}},
    {"paragraph": {"label": "Notes", "variable": "notes", "required": False}},
    {"select": {"label": "Tone", "variable": "tone", "required": False, "options": ["formal", "casual"],
                "default": "formal"}},
    {"number": {"label": "N", "variable": "n", "required": False}},
    {"checkbox": {"label": "Flag", "variable": "flag", "required": False}},
    {"external_data_tool": {"type": "api"}},
]}


def test_form_variables_reads_the_form_and_knows_when_it_is_unknown():
    variables = form_variables(FORM)
    assert [(v.name, v.kind) for v in variables] == [("city", "text-input"), ("notes", "paragraph"),
                                                     ("tone", "select"), ("n", "number"), ("flag", "checkbox")]
    assert variables[0].max_length == 10 and variables[0].required and variables[2].options == ("formal", "casual")
    assert form_variables({}) is None and form_variables({"user_input_form": []}) == []


def test_defaults_are_filled_and_extras_pass_through():
    assert check_inputs(form_variables(FORM), {"city": "Oslo", "extra": 1}) == {
        "city": "Oslo", "extra": 1, "tone": "formal"}


@pytest.mark.parametrize("given, param, words", [
    ({}, "inputs.city", "needs the input 'city' (City)"),
    ({"city": ""}, "inputs.city", "extra_body"),
    ({"city": "Oslo", "tone": "angry"}, "inputs.tone", "'formal', 'casual'"),
    ({"city": "Llanfairpwllgwyngyll"}, "inputs.city", "at most 10"),
    ({"city": 5}, "inputs.city", "must be a string"),
    ({"city": "Oslo", "n": "many"}, "inputs.n", "must be a number"),
    ({"city": "Oslo", "n": True}, "inputs.n", "must be a number"),
    ({"city": "Oslo", "flag": "yes"}, "inputs.flag", "true or false"),
])
def test_bad_inputs_are_400_naming_the_variable(given, param, words):
    with pytest.raises(APIError) as caught:
        check_inputs(form_variables(FORM), given)
    assert caught.value.status_code == 400 and caught.value.param == param and words in caught.value.message


def test_numbers_may_be_numeric_strings():
    assert check_inputs(form_variables(FORM), {"city": "Oslo", "n": "2.5"})["n"] == "2.5"


def test_a_too_long_message_says_it_is_the_message():
    with pytest.raises(APIError) as caught:
        check_inputs(form_variables(FORM), {"city": "A long message here"}, text_variable="city")
    assert caught.value.message.startswith("The message is 19 characters long")


def test_text_variable_choice():
    variables = form_variables(FORM)
    assert text_variable(variables, {}) == "city"
    assert text_variable(variables, {"city": "Oslo"}) == "notes"
    assert text_variable(variables, {}, preferred="notes") == "notes"
    assert text_variable(variables, {}, preferred="absent") == "city"
    assert text_variable(variables, {"city": "a", "notes": "b"}) is None
    assert text_variable(form_variables({"user_input_form": []}), {}) is None
    assert text_variable(None, {}) == "query" and text_variable(None, {}, preferred="text") == "text"
