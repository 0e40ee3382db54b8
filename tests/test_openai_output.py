"""openai_output.py: the chat and text completion bodies and their SSE chunks."""

import json

from openai_output import ChunkEncoder, TextChunkEncoder, completion_body, text_choice


def test_chunk_encoder_shapes():
    encoder = ChunkEncoder("chatcmpl-1", "My App/ü", created=42)
    role = json.loads(encoder.role()[6:])
    assert role == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 42, "model": "My App/ü",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}
    text = "naïve \"quotes\" \n 中文 🎉"
    chunk = encoder.content(text)
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n") == 2
    assert json.loads(chunk[6:])["choices"][0]["delta"] == {"content": text}
    assert json.loads(encoder.finish("stop")[6:])["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                                   "finish_reason": "stop"}
    usage = json.loads(encoder.usage({"prompt_tokens": 3, "completion_tokens": 4})[6:])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_lone_surrogates_still_make_valid_utf8():
    chunk = ChunkEncoder("c", "m", created=1).content("bad \ud800 half")
    chunk.decode("utf-8")
    assert json.loads(chunk[6:])["choices"][0]["delta"]["content"] == "bad \ud800 half"


def test_text_completion_shapes():
    body = completion_body("cmpl-1", 7, "m", text_choice("Hi", "tool_calls"), {"prompt_tokens": 1, "completion_tokens": 2},
                           kind="text_completion")
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                    "choices": [{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    encoder = TextChunkEncoder("cmpl-1", "m", created=7)
    assert encoder.role() == b"" and encoder.reasoning("x") == b"" and encoder.tool_call(0, "i", "n", "{}") == b""
    chunk = json.loads(encoder.content("Hé")[6:])
    assert chunk == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                     "choices": [{"text": "Hé", "index": 0, "logprobs": None, "finish_reason": None}]}
    assert json.loads(encoder.finish("length")[6:])["choices"][0] == {"text": "", "index": 0, "logprobs": None,
                                                                      "finish_reason": "length"}
    usage = json.loads(encoder.usage({"prompt_tokens": 1, "completion_tokens": 1})[6:])
    assert usage["object"] == "text_completion" and usage["choices"] == [] and usage["usage"]["total_tokens"] == 2
