"""The usage figures rule (usage.py): Dify's own figures when they count anything, else estimates."""

from usage import estimate_tokens, usage_figures


def test_the_estimate_is_a_token_per_four_characters_rounded_up_and_none_for_no_text():
    assert [estimate_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_dify_figures_win_when_they_count_anything_else_the_lengths_are_estimated():
    reported = {"prompt_tokens": 0, "completion_tokens": 7, "total_tokens": 7}
    assert usage_figures(reported, 400, 400) is reported
    estimate = {"prompt_tokens": 3, "completion_tokens": 1}
    assert usage_figures(None, 10, 2) == estimate
    assert usage_figures({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, 10, 2) == estimate
