"""The pieces an OpenAI answer is made of, as the translators (dify_events.py) produce them.

A piece is a (kind, value) tuple, in answer order:
  (CONTENT, text)    text to append to the answer;
  (REASONING, text)  thinking to show apart from the answer (`reasoning_content`);
  (REPLACE, text)    Dify's moderation replaced the whole answer with this text;
  (TOOL_CALL, call)  a client tool call {"index", "id", "name", "arguments"};
  (MARK, text)       invisible text that must reach the client whole, in one chunk.
The kinds are compared with `is`. They are a module of their own because every stage of an
answer speaks them: the translators, the thinking splitter, the tool-call parser, the marks,
the pacer and the encoders behind the relay and the collector.
"""

CONTENT = "content"
REASONING = "reasoning"
REPLACE = "replace"
TOOL_CALL = "tool_call"
MARK = "mark"
