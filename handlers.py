"""The HTTP surface: thin handlers that parse, delegate and write.

Every response, Tornado's own 404/405/500 included, is JSON in the OpenAI error shape,
carries the CORS headers browser clients need, and an `x-request-id` that matches the
access log line.
"""

import logging
import time
import uuid
from functools import partial

from tornado.web import RequestHandler, stream_request_body

from completions import Completion, LocalAnswer
from departures import DepartureWatch
from errors import APIError, generic, unauthorized
from identity import bearer_token, dify_user
from in_flight import shutting_down
from memory import Binding
from openai_api import parse_chat_request, parse_text_completion_request
from openai_output import (ChunkEncoder, TextChunkEncoder, chat_choice, completion_body, json_bytes, model_object,
                           new_completion_id, new_text_completion_id, text_choice)
from request_body import BoundedBody
from streaming import EventStreamResponse
from tasks import local_answer, task_kind

log = logging.getLogger("opendify.handlers")


class BaseHandler(RequestHandler):
    """What every endpoint shares: the client's key checked, CORS, a request id, and errors as OpenAI JSON
    (Tornado's own 404/405/500 included). `model`, `app`, `tokens` and `error_code` feed the access line."""

    model = None
    app = None  # the served app the request named, once resolved
    tokens = None
    error_code = None

    @property
    def proxy(self):
        return self.application.settings["proxy"]

    def set_default_headers(self):
        if not hasattr(self, "request_id"):
            self.request_id = "req_" + uuid.uuid4().hex[:20]
            self.started = time.monotonic()
        self.set_header("x-request-id", self.request_id)
        self.set_header("Content-Type", "application/json")
        origin = self.request.headers.get("Origin")
        allowed = self.proxy.settings.cors_origins
        if origin and ("*" in allowed or origin in allowed):
            self.set_header("Access-Control-Allow-Origin", "*" if "*" in allowed else origin)
            self.set_header("Access-Control-Expose-Headers", "x-request-id, x-dify-conversation-id")
            if "*" not in allowed:
                self.set_header("Vary", "Origin")

    def prepare(self):
        if self.request.method == "OPTIONS":
            return
        token = bearer_token(self.request.headers.get("Authorization"))
        if not token:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>' with a key from the "
                               "server's VALID_API_KEYS.")
        self.client = self.proxy.clients.client_for(token)
        if self.client is None:
            raise unauthorized("Incorrect API key provided.")

    def options(self, *args):
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.set_header("Access-Control-Allow-Headers",
                        self.request.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        self.set_header("Access-Control-Max-Age", "86400")
        self.clear_header("Content-Type")
        self.set_status(204)
        self.finish()

    def write_json(self, data):
        self.finish(json_bytes(data))

    def write_error(self, status_code, **kwargs):
        error = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(error, APIError):
            error = generic(status_code, self._reason)
        self.error_code = error.code
        for name, value in error.headers().items():
            self.set_header(name, value)
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_header("Content-Type", "application/json")
        self.finish(json_bytes(error.body()))

    def allowed_methods(self):
        """The methods this handler implements (RFC 9110 requires them in a 405's `Allow`)."""
        return [method for method in self.SUPPORTED_METHODS
                if getattr(type(self), method.lower()) is not getattr(RequestHandler, method.lower())]


class NotFoundHandler(BaseHandler):
    """Any other path: an OpenAI-shaped 404 (Tornado's would be HTML)."""

    def prepare(self):
        raise generic(404, "")


class ModelsHandler(BaseHandler):
    """GET /v1/models: the served apps (right after start-up, once the first /info round is in)."""

    async def get(self):
        await self.proxy.registry.first_listing()
        self.write_json({"object": "list", "data": [model_object(app) for app in self.proxy.registry.all()]})


class ModelHandler(BaseHandler):
    """GET /v1/models/{id}: one served app, or a 404 naming those there are."""

    async def get(self, model_id):
        app = await self.proxy.registry.resolve(model_id)
        if app is None:
            raise model_not_found(model_id, self.proxy.registry)
        self.write_json(model_object(app))


def model_not_found(model_id, registry):
    """A 404 naming the models there are; a 503 instead when Dify could not be reached to look the model
    up (the DIFY_API_KEYS are then not to blame)."""
    if registry.unreachable is not None:
        return APIError(503, f"Dify cannot be reached ({registry.unreachable}), so the model '{model_id}' cannot be "
                             "looked up; try again shortly.", type="server_error", code="upstream_unreachable",
                        retry=True, retry_after=2)
    names = ", ".join(sorted(app.model_id for app in registry.all())) or "none (check the server's DIFY_API_KEYS)"
    return APIError(404, f"The model '{model_id}' does not exist. Available models: {names}.",
                    code="model_not_found", param="model")


@stream_request_body
class AnswerHandler(BoundedBody, BaseHandler):
    """A POST answered by one Dify run, streamed or whole; each protocol (chat, text completions, the
    Responses API) is a subclass that says how to read its request and write its answer. `post` owns
    the run's lifetime: whatever happens (an answer, an error, a client that leaves at any moment), its
    `finally` ends the run and stops watching the client. The Completion is kept on the handler so that
    `on_connection_close` can cancel it."""

    marks = True  # mode 2 keeps the conversation in marks (the Responses API keeps it in response ids)
    names_conversation = True  # a whole answer names its Dify conversation in X-Dify-Conversation-Id
    completion = None
    stream = None
    departed = False

    async def post(self):
        watch = DepartureWatch(self.request.connection.stream)
        self.proxy.in_flight.add(self)
        try:
            await self.answer()
        finally:
            watch.stop()
            self.proxy.in_flight.discard(self)
            if self.completion is not None:
                self.completion.close()
                if self.completion.stopping is not None:
                    self.proxy.in_flight.track(self.completion.stopping)

    def shut_down(self):
        """The server is stopping and this answer ran past the grace period: a stream that started ends
        with an error event and `[DONE]`, a request still waiting gets a 503; the Dify run is stopped."""
        error = shutting_down()
        if self.stream is not None and self.stream.committed:
            self.stream.end(error)
        elif not self._finished:
            self.send_error(503, exc_info=(APIError, error, None))
        if self.completion is not None:
            self.completion.cancel()

    async def answer(self):
        """One flow for every protocol: read the request, begin its run, then relay it as a stream or
        write it whole. What a protocol does differently is in the methods below, which subclasses
        override."""
        request = await self.read()
        await self.begin(request)
        try:
            await self.completion.start()
            if request.stream:
                self.stream = EventStreamResponse(self, self.completion, self.encoder(request))
                await self.stream.run()
                self.tokens = self.completion.usage()
                return
            answer = await self.completion.collect()
        except APIError as error:
            raise self.explained(error)
        if self.completion.cancelled:
            return
        self.tokens = self.completion.usage()
        if self.names_conversation and self.completion.conversation_id:
            self.set_header("X-Dify-Conversation-Id", self.completion.conversation_id)
        self.write_json(self.answer_body(request, answer))

    async def begin(self, request):
        """Resolves the model and makes its Completion, or a background task's under TASK_MODEL (early
        failures raise APIError); a client that has left by then gets no run."""
        self.model = request.model
        self.app = await self.proxy.registry.resolve(request.model)
        if self.app is None:
            raise model_not_found(request.model, self.proxy.registry)
        self.continues(request)
        app, task, local = self.app, task_kind(request.messages), None
        if task is not None:
            app, local = await self.task_runner(app, task, request.messages)
        binding = Binding(self.proxy.secret, app.mark_id, self.client)
        kind = Completion if local is None else partial(LocalAnswer, local)
        self.completion = kind(self.proxy.dify, app, request, dify_user(self.client, request.user),
                               self.proxy.settings, binding, self.proxy.uploads, self.proxy.conversations, task=task,
                               marks=self.marks)
        if self.departed:
            self.completion.cancel()

    async def task_runner(self, app, task, messages):
        """(app, the proxy's own answer or None) for a background task under TASK_MODEL: the requested app
        (empty), the proxy itself (`local`, when it can answer that task), or the named model."""
        setting = self.proxy.settings.task_model
        if setting == "local":
            return app, local_answer(task, messages)
        if setting:
            routed = await self.proxy.registry.resolve(setting)
            if routed is not None:
                return routed, None
            log.warning("TASK_MODEL=%r names no model; the background task runs on the requested one", setting)
        return app, None

    def on_connection_close(self):
        super().on_connection_close()
        self.departed = True
        if self.completion is not None:
            self.completion.cancel()

    async def read(self):
        """The ChatRequest the run serves, read from the body (a protocol also makes its ids here)."""
        raise NotImplementedError

    def continues(self, request):
        """Names the Dify conversation the request continues when its body does not: the header's."""
        if not request.conversation_id:
            request.conversation_id = self.request.headers.get("X-Dify-Conversation-Id", "").strip()

    def encoder(self, request):
        """The stream's event encoder (see streaming.EventStreamResponse)."""
        raise NotImplementedError

    def answer_body(self, request, answer):
        """The whole answer's JSON body."""
        raise NotImplementedError

    def explained(self, error):
        """An error of the run said in the client's terms (a chat request's own are already)."""
        return error


class ChatCompletionsHandler(AnswerHandler):
    """POST /v1/chat/completions."""

    parse_request = staticmethod(parse_chat_request)
    new_id = staticmethod(new_completion_id)
    encoder_class = ChunkEncoder
    kind = "chat.completion"

    async def read(self):
        self.completion_id = self.new_id()
        return await self.read_request(self.parse_request)

    def encoder(self, request):
        return self.encoder_class(self.completion_id, request.model)

    def answer_body(self, request, answer):
        return completion_body(self.completion_id, int(time.time()), request.model, self.choice(answer), self.tokens,
                               kind=self.kind)

    def choice(self, answer):
        return chat_choice(answer.message(), self.completion.finish_reason())


class TextCompletionsHandler(ChatCompletionsHandler):
    """Legacy POST /v1/completions (Continue's autocomplete, LlamaIndex `OpenAILike`): the prompt is
    run like a one-message chat and answered in the text_completion shape."""

    names_conversation = False
    parse_request = staticmethod(parse_text_completion_request)
    new_id = staticmethod(new_text_completion_id)
    encoder_class = TextChunkEncoder
    kind = "text_completion"

    def choice(self, answer):
        return text_choice("".join(answer.content), self.completion.finish_reason())


def routes():
    return [
        (r"/v1/models", ModelsHandler),
        (r"/v1/models/(.+)", ModelHandler),
        (r"/v1/chat/completions", ChatCompletionsHandler),
        (r"/v1/completions", TextCompletionsHandler),
    ]
