"""Dify's files and a workflow's outputs as answer markdown."""

import json

from answer_markdown import file_markdown, render_outputs


def test_render_outputs():
    assert render_outputs({"result": "Bonjour"}) == "Bonjour"
    assert json.loads(render_outputs({"a": 1, "b": "x"})) == {"a": 1, "b": "x"}
    assert render_outputs({"a": 1, "b": "ü"}).count("\n") == 3 and "ü" in render_outputs({"a": 1, "b": "ü"})
    assert render_outputs({"n": 42}) == "42"
    assert render_outputs({}) == "" and render_outputs(None) == "" and render_outputs({"x": None}) == ""
    image = {"dify_model_identity": "__dify__file__", "type": "image", "url": "/files/x.png", "filename": "x.png"}
    assert render_outputs({"pic": image}, "https://d.example/") == "![x.png](https://d.example/files/x.png)"
    assert render_outputs({"pics": [image, {**image, "type": "document", "filename": "r.pdf"}]}) == (
        "![x.png](/files/x.png)\n\n[r.pdf](/files/x.png)")


def test_file_markdown_keeps_absolute_urls():
    assert file_markdown({"type": "image", "url": "https://cdn.example/a.png"}, "https://d/") == (
        "![image](https://cdn.example/a.png)")
    assert file_markdown({"type": "image"}) == ""
