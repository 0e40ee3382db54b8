"""Rebuilds openai_responses_schemas.json: the Responses API schemas the tests validate against.

Source: github.com/openai/openai-openapi, openapi.json (the public OpenAI OpenAPI spec). The
commit used is recorded in the output's `source`. Run: python extract_responses_schemas.py <openapi.json> <commit>
It keeps `Response`, the stream events the proxy emits, and every schema they reference.
"""

import json
import sys

EVENTS = (
    "ResponseCreatedEvent", "ResponseInProgressEvent", "ResponseCompletedEvent", "ResponseFailedEvent",
    "ResponseIncompleteEvent", "ResponseOutputItemAddedEvent", "ResponseOutputItemDoneEvent",
    "ResponseContentPartAddedEvent", "ResponseContentPartDoneEvent", "ResponseTextDeltaEvent",
    "ResponseTextDoneEvent", "ResponseFunctionCallArgumentsDeltaEvent", "ResponseFunctionCallArgumentsDoneEvent",
    "ResponseReasoningSummaryPartAddedEvent", "ResponseReasoningSummaryPartDoneEvent",
    "ResponseReasoningSummaryTextDeltaEvent", "ResponseReasoningSummaryTextDoneEvent", "ResponseErrorEvent",
)


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"].rsplit("/", 1)[-1]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def main(path, commit):
    schemas = json.load(open(path))["components"]["schemas"]
    keep, todo = {}, ["Response", *EVENTS]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep[name] = schemas[name]
            todo.extend(refs(schemas[name]))
    events = {schemas[name]["properties"]["type"]["enum"][0]: name for name in EVENTS}
    out = {"source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json",
           "events": events, "components": {"schemas": dict(sorted(keep.items()))}}
    json.dump(out, open("openai_responses_schemas.json", "w"), indent=1, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
