"""Token usage figures for an answer: Dify's own when it reports them, else an estimate.

Dify reports no usage for some runs (a stopped or failed one, apps whose model does not say,
a workflow's total without its split, an answer read back from its message history), yet
OpenAI clients show and bill by the figures. The estimate is one token per four characters,
rounded up, kept here so that every path counts alike.
"""


def estimate_tokens(text_length):
    """Tokens for a text of `text_length` characters: one per four, rounded up (none for no text)."""
    return (text_length + 3) // 4


def usage_figures(reported, prompt_length, answer_length):
    """Dify's usage figures (a dict, or None) when they count anything; else estimates from the lengths
    of the text sent (the prompt) and of the answer."""
    if reported and (reported.get("total_tokens") or reported.get("prompt_tokens")
                     or reported.get("completion_tokens")):
        return reported
    return {"prompt_tokens": estimate_tokens(prompt_length), "completion_tokens": estimate_tokens(answer_length)}
