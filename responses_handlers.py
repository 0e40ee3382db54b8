"""The Responses API over HTTP: `POST /v1/responses` and `GET /v1/responses/{id}`.

Thin like the chat handlers, whose auth, CORS, body limit, error bodies, flow (begin,
background-task routing, client-gone handling) they inherit. The run is the chat path's
Completion (without conversation marks: a response id carries the conversation instead,
see responses_ids.py); only parsing and encoding are the Responses API's own
(responses_request.py, responses_output.py).
"""

import time
from urllib.parse import urlencode

from apps import CHAT_FAMILY
from completions import Answer
from dify_client import DifyError, DifyFailure
from dify_events import translator_for
from errors import APIError, bad_request, from_dify_failure
from handlers import AnswerHandler, BaseHandler
from identity import dify_user
from responses_ids import make_response_id, read_response_id
from responses_output import ResponseEventEncoder, answer_output, ending, response_object
from responses_request import parse_responses_request, response_echo
from usage import usage_figures

HISTORY_PAGE = 100  # the most messages one Dify GET /messages returns: how far back GET /v1/responses/{id} reaches


class ResponsesHandler(AnswerHandler):
    """POST /v1/responses: one Dify run answered as a response object or its event stream. The flow is
    the chat handler's (AnswerHandler: its begin, background-task routing included, departures and the
    final close); only reading the request and writing the answer are the Responses API's own."""

    marks = False  # the response id carries the conversation
    response_id = None

    async def read(self):
        self.responses = await self.read_request(parse_responses_request)
        self.created_at = int(time.time())
        return self.responses.chat

    def continues(self, request):
        """A `previous_response_id` names the conversation (and the Dify user) the request continues."""
        if self.responses.previous_response_id:
            ref = self.previous_response(self.responses.previous_response_id)
            request.conversation_id, request.user = ref.conversation_id, ref.user

    def encoder(self, request):
        return ResponseEventEncoder(self.describe, self.identified)

    def answer_body(self, request, answer):
        status, incomplete = ending(self.completion.finish_reason())
        return self.describe(answer_output(answer), status, None, incomplete)

    def previous_response(self, response_id):
        """The ResponseRef of `previous_response_id`, or a 400 that says why it cannot be continued."""
        secret, app = self.proxy.secret, self.app
        ref = read_response_id(secret, app.mark_id, self.client, response_id)
        if ref is None:
            other = next((o for o in self.proxy.registry.all() if o.mark_id != app.mark_id
                          and read_response_id(secret, o.mark_id, self.client, response_id)), None)
            if other is not None:
                raise bad_request(f"previous_response_id '{response_id}' is a response of model '{other.model_id}', "
                                  f"not '{app.model_id}': continue it with that model, or send the whole history "
                                  "without previous_response_id.", param="previous_response_id",
                                  code="previous_response_not_found")
            raise bad_request(f"Previous response with id '{response_id}' not found: it was not made by this server "
                              "for this API key.", param="previous_response_id", code="previous_response_not_found")
        if not ref.conversation_id or app.mode not in CHAT_FAMILY:
            raise bad_request(f"previous_response_id '{response_id}' cannot be continued: model '{app.model_id}' is a "
                              f"Dify {app.mode} app, which keeps no conversation. Send the whole history in 'input' "
                              "instead.", param="previous_response_id", code="previous_response_not_found")
        return ref

    def explained(self, error):
        """An error said in the client's terms: its input items, and Dify's 404 for a continued conversation."""
        previous = self.responses.previous_response_id
        error = self.responses.client_terms(error)
        if previous and error.status_code == 404:
            return APIError(404, f"The Dify conversation of previous_response_id '{previous}' no longer exists "
                                 "(deleted or expired in Dify). Send the whole history in 'input' without "
                                 "previous_response_id to start afresh.", param="previous_response_id",
                            code="conversation_not_found")
        return error

    def identified(self):
        """Whether the response id can be made: the run has named its Dify message (or keeps none)."""
        return self.completion.translator.message_id is not None or self.completion.app.mode == "workflow"

    def current_id(self):
        if self.response_id is None:
            self.response_id = make_response_id(self.proxy.secret, self.app.mark_id, self.client,
                                                self.completion.conversation_id or "",
                                                self.completion.translator.message_id, self.completion.request.user)
        return self.response_id

    def describe(self, output, status, error=None, incomplete=None):
        usage = self.completion.usage() if status != "in_progress" else None
        return response_object(self.current_id(), self.created_at, self.model, self.responses.echo, output, status,
                               usage, error, incomplete, self.responses.previous_response_id)


class ResponseHandler(BaseHandler):
    """GET /v1/responses/{id}: a chat-family app's response read back from Dify's message history."""

    async def get(self, response_id):
        app, ref = self.owner(response_id)
        if not ref.conversation_id:
            raise APIError(404, f"Response '{response_id}' was made by model '{app.model_id}', a Dify {app.mode} app; "
                                "Dify keeps no history for those, so it cannot be read back.", code="not_found")
        user = dify_user(self.client, ref.user)
        query = urlencode({"conversation_id": ref.conversation_id, "user": user, "limit": HISTORY_PAGE})
        try:
            page = await self.proxy.dify.get(app.key, f"/messages?{query}")
        except DifyFailure as failure:
            if isinstance(failure, DifyError) and failure.status == 404:
                raise APIError(404, f"The Dify conversation of response '{response_id}' no longer exists "
                                    "(deleted or expired in Dify).", code="not_found")
            raise from_dify_failure(failure, app.model_id)
        rows = page.get("data") if isinstance(page, dict) else None
        row = next((r for r in rows or () if isinstance(r, dict) and r.get("id") == ref.message_id), None)
        if row is None:
            raise APIError(404, f"Response '{response_id}' is not among the newest {HISTORY_PAGE} messages of its "
                                "Dify conversation, so it cannot be read back.", code="not_found")
        self.model, self.app = app.model_id, app
        text = row.get("answer") if isinstance(row.get("answer"), str) else ""
        query_text = row.get("query") if isinstance(row.get("query"), str) else ""
        usage = usage_figures(None, len(query_text), len(text))
        created = row.get("created_at") if isinstance(row.get("created_at"), int) else int(time.time())
        self.write_json(response_object(response_id, created, app.model_id, response_echo({}, None),
                                        answer_output(self.stored_answer(app, text)), "completed", usage))

    def stored_answer(self, app, text):
        """An answer as Dify stored it, read by the app's translator: thinking becomes reasoning again."""
        translator = translator_for(app.mode, app.model_id, self.proxy.settings)
        answer = Answer()
        answer.add(translator.feed({"event": "message", "answer": text}))
        answer.add(translator.feed({"event": "message_end", "metadata": {}}))
        return answer

    def owner(self, response_id):
        """(app, ResponseRef) of an id this client's key made, else a 404."""
        for app in self.proxy.registry.all():
            ref = read_response_id(self.proxy.secret, app.mark_id, self.client, response_id)
            if ref is not None:
                return app, ref
        raise APIError(404, f"No response with id '{response_id}' exists for this API key.", code="not_found")


def response_routes():
    return [
        (r"/v1/responses", ResponsesHandler),
        (r"/v1/responses/([^/]+)", ResponseHandler),
    ]
