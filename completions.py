"""One chat completion: the OpenAI request made into a Dify run, and the run read back as pieces.

Dify is always asked to stream, even when the client wants one JSON body: agent apps
only stream, and Dify Cloud cuts blocking calls after about 100 s.
"""

import hashlib
import hmac
import logging

from tornado.ioloop import IOLoop

import memory
from dify_client import DifyError, StreamFailure
from errors import APIError, bad_request, from_dify, upstream_broken, upstream_timeout, upstream_unreachable
from files import Uploads
from events import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL, translator_for
from inputs import check_inputs, form_variables, text_variable

log = logging.getLogger("opendify.completions")

_MAX_USER_FIELD = 64
_STOP_KINDS = {"completion": "completion", "workflow": "workflow"}


def client_id(secret, api_key):
    """An opaque, stable id for a client key: Dify users and marks are bound to it, never to the key."""
    return hmac.new(secret, b"opendify-client\0" + api_key.encode(), hashlib.sha256).hexdigest()[:16]


def dify_user(client, request_user=""):
    """The Dify end user for a request: the client's id, plus the request's own `user` if it sent one,
    so two client keys never share a Dify end user (nor, through it, a conversation)."""
    if request_user:
        return f"opendify-{client}:{request_user[:_MAX_USER_FIELD]}"
    return f"opendify-{client}"


def estimate_tokens(text_length):
    return max(1, (text_length + 3) // 4) if text_length else 0


class Answer:
    """A whole answer gathered from its pieces, for a non-streaming response."""

    def __init__(self):
        self.content = []
        self.reasoning = []
        self.tool_calls = []

    def add(self, pieces):
        for kind, value in pieces:
            if kind is CONTENT or kind is MARK:
                self.content.append(value)
            elif kind is REASONING:
                self.reasoning.append(value)
            elif kind is REPLACE:
                self.content = [value]
            elif kind is TOOL_CALL:
                self.tool_calls.append({"id": value["id"], "type": "function",
                                        "function": {"name": value["name"], "arguments": value["arguments"]}})

    def message(self):
        """The OpenAI assistant message; content is null when the answer is only tool calls."""
        text = "".join(self.content)
        message = {"role": "assistant", "content": text if text or not self.tool_calls else None, "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class Completion:
    """Drives one Dify run for one OpenAI request and yields its pieces in order."""

    def __init__(self, dify, app, request, user, settings=None):
        self.dify = dify
        self.app = app
        self.request = request
        self.user = user
        self.settings = settings
        self.translator = translator_for(app.mode, request.model, settings)
        self.answer_length = 0
        self.query_length = 0
        self.called_tools = False
        self._stream = None
        self._cancelled = False
        self._pending_error = None

    def query(self):
        """The text Dify is asked (mode 1: the whole transcript folded into it)."""
        query = memory.fold_query(self.request.messages)
        if not query.strip():
            raise bad_request("The messages contain no text to send to the app.", param="messages",
                              code="empty_query")
        return query

    uploads = None  # the proxy's files.Uploads (limits and upload cache), set by the handler

    async def attachments(self):
        """Dify file objects for the files of the new turn; a bad file is refused before anything is uploaded."""
        uploads = self.uploads or Uploads(self.dify)
        return await uploads.attach(self.app, self.request.messages, self.user, self.request.model)

    def dify_request(self, query, files):
        """The Dify path and body for the app's mode. Completion and workflow apps read the user's text
        from their input form (a workflow has no `query` at all) and keep no conversation."""
        self.query_length = len(query)
        mode = self.app.mode
        form = form_variables(self.app.parameters)
        given = self.request.inputs
        target = None
        if mode in ("completion", "workflow"):
            target = text_variable(form, given, self.settings.input_variable if self.settings else "")
            if target is not None:
                given = {**given, target: query}
        body = {"inputs": check_inputs(form, given, target), "user": self.user, "response_mode": "streaming"}
        if files:
            body["files"] = files
        if mode == "workflow":
            return "/workflows/run", body
        if mode == "completion":
            if target is None:
                body["query"] = query
            return "/completion-messages", body
        body.update({"query": query, "conversation_id": "", "auto_generate_name": False})
        return "/chat-messages", body

    async def start(self):
        """Builds the Dify request and opens the stream; early failures raise APIError."""
        query = self.query()
        files = await self.attachments()
        path, body = self.dify_request(query, files)
        self._stream = self.dify.stream(self.app.key, path, body)

    async def next_pieces(self):
        """The pieces from Dify's next batch of events (possibly none); None once the answer is complete."""
        translator = self.translator
        if self._pending_error is not None:
            raise self._pending_error
        if translator.done or self._cancelled:
            return None
        try:
            events = await self._stream.next_events()
        except DifyError as error:
            raise self._dify_error(error)
        except StreamFailure as failure:
            raise self._failure_error(failure)
        if events is None:
            if self._cancelled:
                return None
            if translator.failure is not None:
                raise translator.failure
            raise upstream_broken(self.request.model, "ended its answer without finishing it")
        pieces = []
        for event in events:
            try:
                found = translator.feed(event)
            except APIError as error:
                if not pieces:
                    raise
                # Text that arrived with the error is still the client's: deliver it, then the error.
                self._pending_error = error
                break
            if found:
                pieces.extend(found)
                for kind, text in found:
                    if kind is CONTENT:
                        self.answer_length += len(text)
                    elif kind is REPLACE:
                        self.answer_length = len(text)
            if translator.done:
                break
        return pieces

    async def collect(self):
        """The whole answer, for a non-streaming client."""
        answer = Answer()
        while (pieces := await self.next_pieces()) is not None:
            answer.add(pieces)
        return answer

    def finish_reason(self):
        return "tool_calls" if self.called_tools else self.translator.finish_reason()

    def usage(self):
        """Dify's usage figures, or an estimate from the text lengths when Dify reported none."""
        usage = self.translator.usage or {}
        if usage.get("total_tokens") or usage.get("prompt_tokens") or usage.get("completion_tokens"):
            return usage
        return {"prompt_tokens": estimate_tokens(self.query_length),
                "completion_tokens": estimate_tokens(self.answer_length)}

    @property
    def cancelled(self):
        return self._cancelled

    def cancel(self):
        """The client left: stop reading, and ask Dify to stop generating for nobody."""
        if self._cancelled or self._stream is None:
            return
        self._cancelled = True
        unfinished = not self.translator.done
        self._stream.close()
        task_id = self._stream.task_id
        if unfinished and task_id:
            IOLoop.current().spawn_callback(self._stop, task_id)

    async def _stop(self, task_id):
        try:
            await self.dify.stop(self.app.key, _STOP_KINDS.get(self.app.mode, "chat"), task_id, self.user)
            log.info("client left: stopped the Dify task of model %r", self.request.model)
        except (DifyError, StreamFailure) as error:
            log.warning("client left, and stopping the Dify task of model %r failed: %s", self.request.model, error)

    def _dify_error(self, error):
        api = from_dify(error.status, error.code, error.message, self.request.model)
        if error.retry_after and api.retry_after is None:
            api.retry_after = error.retry_after
        return api

    def _failure_error(self, failure):
        model = self.request.model
        if failure.kind == "unreachable":
            return upstream_unreachable(model, failure.detail)
        if failure.kind == "timeout":
            return upstream_timeout(model, self.dify.idle_timeout)
        if failure.kind == "malformed":
            return upstream_broken(model, failure.detail)
        return upstream_broken(model, "closed the connection before the answer was complete")
