"""One chat completion's Dify run, owned from start to end: `Completion` plans the query, uploads
the files, starts the run, retries a refusal it can mend, and stops or closes the run however
the request ends. How the request is written for Dify is dify_requests.py; how the run's
events become the answer's pieces is answer_pipeline.py.

Dify is always asked to stream, even when the client wants one JSON body: agent apps
only stream, and Dify Cloud cuts blocking calls after about 100 s.
"""

import asyncio
import logging

from tornado.ioloop import IOLoop

import memory
import metrics
from answer_pipeline import AnswerPipeline, ReplyMark
from apps import CHAT_FAMILY
from content import content_text
from dify_client import DifyError, DifyFailure, DifyTransportError
from dify_events import translator_for
from dify_requests import (app_inputs, dify_query, dify_request, fits, kept_tools, message_variable, offered_tools,
                           text_parts)
from errors import bad_request, from_dify, from_dify_failure, upstream_broken
from pieces import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL
from tool_calls import openai_tool_call
from usage import usage_figures

log = logging.getLogger("opendify.completions")

_SLICE = 256  # events translated per turn of the loop: a long burst from Dify must not hold it for others
_STOP_KINDS = {"completion": "completion", "workflow": "workflow"}


LONG_HISTORY = 500  # messages; folding a longer history (0.4 s for 20,000) is done off the event loop


async def off_loop_if_long(messages, function, *args):
    """`function(*args)`, in an executor thread when the history is long, so other requests keep flowing
    (pure Python: the thread hands the GIL back to the loop every few milliseconds)."""
    if len(messages) <= LONG_HISTORY:
        return function(*args)
    return await IOLoop.current().run_in_executor(None, function, *args)


class Answer:
    """A whole answer gathered from its pieces, for a non-streaming response."""

    def __init__(self):
        self.content = []
        self.reasoning = []
        self.tool_calls = []
        self.legacy = False

    def add(self, pieces):
        for kind, value in pieces:
            if kind is CONTENT or kind is MARK:
                self.content.append(value)
            elif kind is REASONING:
                self.reasoning.append(value)
            elif kind is REPLACE:
                self.content = [value]
            elif kind is TOOL_CALL:
                self.tool_calls.append(openai_tool_call(value))
                self.legacy = bool(value.get("legacy"))

    def message(self):
        """The OpenAI assistant message; content is null when the answer is only tool calls."""
        text = "".join(self.content)
        message = {"role": "assistant", "content": text if text or not self.tool_calls else None, "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls and self.legacy:
            message["function_call"] = self.tool_calls[0]["function"]
        elif self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class Completion:
    """The one owner of one Dify run for one OpenAI request: it starts, retries and ends the run, and
    yields the answer's pieces in order (`next_pieces` for a stream, `collect` for one body)."""

    def __init__(self, dify, app, request, user, settings, binding, uploads, conversations, task=None, marks=True):
        self.dify = dify
        self.task = task
        self.app = app
        self.request = request
        self.user = user
        self.settings = settings
        self.translator = translator_for(app.mode, request.model, settings)
        self.binding = binding
        self.uploads = uploads
        self.conversations = conversations
        self.conversational = app.mode in CHAT_FAMILY
        # `marks=False`: the protocol keeps the conversation elsewhere (the Responses API's response ids).
        self.reads_marks = marks and task is None and self.conversational and settings.conversation_memory_mode == 2
        self.plan = None
        # A background task is answered in text, whatever tools came with it.
        self.tool_request = None if task is not None else kept_tools(
            request.tools, settings.client_tools_for(request.model), app.mode)
        self.pipeline = self._answer_pipeline()
        self._tools_seen = None
        self._tool_text = ""
        self._inputs = {}
        self._target = None  # the input variable holding the user's text (completion and workflow apps)
        self.format_instructions = request.format_instructions
        self.query_length = 0
        self._stream = None
        self._cancelled = False
        self._closed = False
        self._retried = False
        self._files = []
        self.stopping = None  # the call telling Dify to stop the run, once made
        self._backlog = None  # events of a long burst still to translate, from _backlog_at on
        self._backlog_at = 0

    def _answer_pipeline(self):
        """The stages this request's answer passes (answer_pipeline.py). A reply that must parse as JSON
        carries no mark: its conversation id is in X-Dify-Conversation-Id."""
        structured = self.request.structured
        marked = self.reads_marks and not structured
        return AnswerPipeline(self.translator, self.tool_request, structured,
                              ReplyMark(self._reply_mark, self.request.stream) if marked else None)

    def _reply_mark(self, reply_text, calls):
        """The mark for this reply (memory.reply_mark); None when the run named no conversation."""
        conversation_id = self.translator.conversation_id
        if not conversation_id:
            return None
        return memory.reply_mark(conversation_id, self.translator.message_id, self._tools_seen, self.request.messages,
                                 reply_text, [openai_tool_call(call) for call in calls], self.binding)

    async def start(self):
        """Plans the query, uploads the files and opens the Dify stream; early failures raise APIError.
        A client that left while the files were uploading gets no run at all."""
        # Everything checkable is checked before any Dify call (a conversation check, an upload): a chat app's
        # inputs before its query is planned, a completion or workflow app's (one holds the message) with it.
        form, self._target = message_variable(self.app, self.request.inputs, self.settings.input_variable)
        if self.conversational:
            self._inputs = app_inputs(form, self.request.inputs, None, "", self._text_parts)
        self.plan = await self._plan()
        query = self._query()
        if not self.conversational:
            query = self._fitted(query, form)
            self._inputs = app_inputs(form, self.request.inputs, self._target, query, self._text_parts)
        self._files = await self._attachments()
        self._open(query)

    async def _plan(self):
        """What to ask Dify: in mode 1 the whole transcript folded into one query; in mode 2 (or with an
        explicit conversation id) only the turns Dify's conversation has not seen, once Dify confirms
        that conversation is still the one to continue."""
        messages = self.request.messages
        explicit = self.request.conversation_id if self.conversational and self.task is None else ""
        if self.reads_marks or explicit:
            plan = await off_loop_if_long(messages, memory.plan_conversation, messages, self.binding, explicit)
            if plan.sits_on is not None:
                plan = await self._check_newest(plan)
            else:
                plan = await self._check_conversation(plan)
        else:
            folded = await off_loop_if_long(messages, memory.fold_query, messages)
            plan = memory.fresh_plan(folded)
        if not plan.fresh_query.strip():
            raise bad_request("The messages contain no text to send to the app.", param="messages",
                              code="empty_query")
        return plan

    async def _check_newest(self, plan):
        """The plan to follow: a marked conversation is continued only if the marked reply is still its
        newest message in Dify; after a regenerate or an edit of the last turn Dify holds a discarded
        answer after it, and after a deletion nothing; both start a fresh conversation from the whole
        visible chat."""
        model = self.request.model
        try:
            latest = await self.dify.latest_message(self.app.key, plan.conversation_id, self.user)
        except DifyFailure as error:
            log.warning("model %r: could not read the Dify conversation's newest message (%s); continuing it "
                        "unchecked", model, error.label)
            return plan
        if latest is None:
            return self._afresh(plan, "Dify no longer has this chat's conversation")
        if not memory.is_newest(plan, latest.get("id"), self.binding):
            return self._afresh(plan, "the chat's last turn was regenerated or edited (its Dify conversation is "
                                      "stale)")
        return plan

    async def _check_conversation(self, plan):
        """The plan to follow, for a conversation `_check_newest` does not check (an explicit id, a mark of
        the first version) on an app whose Dify (1.13+) answers an unknown one with silence: Dify is
        asked whether it still exists; an explicit id that is gone is a 404, a marked chat whose
        conversation is gone starts afresh from the whole visible history, both at once."""
        if not plan.conversation_id or not self.conversations.needed(self.app.mode):
            return plan
        try:
            alive = await self.conversations.exists(self.app.key, self.user, plan.conversation_id)
        except DifyTransportError as failure:
            raise self._reported(failure)
        if alive:
            return plan
        if plan.explicit:
            raise from_dify(404, "not_found", "Conversation Not Exists.", self.request.model)
        return self._afresh(plan, "Dify no longer has this chat's conversation")

    def _afresh(self, plan, reason):
        """The plan for a fresh Dify conversation from the whole visible chat, logged with the reason."""
        log.info("model %r: %s; starting a fresh one from the full history", self.request.model, reason)
        return plan.fresh()

    def _query(self):
        """The text Dify is asked for the current plan. Keeps what the client's tools make of it: the
        catalogue the conversation will have seen (for the reply's mark) and the tool text."""
        self._tools_seen, self._tool_text = offered_tools(self.tool_request, self.plan, self.binding)
        return dify_query(self.plan.query, self._tool_text, self.format_instructions)

    def _fitted(self, query, form):
        """A forced tool's catalogue goes into a completion or workflow app's input only if it fits the
        variable's max_length; otherwise the app gets the text without it (and answers in text)."""
        if self._target is None:
            if self.app.mode == "workflow":
                log.debug("model %r: the workflow's input form has no free text variable; the message is not "
                          "sent (its inputs are)", self.request.model)
            return query
        if not self._tool_text or fits(form, self._target, query):
            return query
        log.debug("model %r: the tool catalogue does not fit the input '%s'; sent without it", self.request.model,
                  self._target)
        self.tool_request = None
        self.pipeline = self._answer_pipeline()
        return self._query()

    def _text_parts(self):
        return text_parts(self.request.messages, self._tool_text, self.format_instructions)

    async def _attachments(self):
        """Dify file objects for the files of the new turn; a bad file is refused before anything is uploaded."""
        return await self.uploads.attach(self.app, self.request.messages, self.user, self.request.model)

    def _open(self, query):
        """Opens the Dify stream for `query` with the current plan, inputs and files; none once the client
        has left."""
        self.query_length = len(query)
        if self._cancelled or self._closed:
            return
        path, body = dify_request(self.app, self.user, query, self._inputs, self._target, self.plan.conversation_id,
                                  self._files)
        self._stream = self.dify.stream(self.app.key, path, body)

    async def _retry(self, error):
        """Whether a refusal before any event can be mended once: a marked conversation Dify no longer
        has starts afresh from the whole visible chat; a cached upload Dify no longer has is re-sent."""
        if self._retried:
            return False
        if error.status == 404 and self.plan.conversation_id and not self.plan.explicit:
            self.plan = self._afresh(self.plan, "Dify no longer has this chat's conversation")
        elif error.status == 400 and self._files and "upload file" in error.message.lower():
            log.info("model %r: Dify no longer has a cached upload; uploading the files again", self.request.model)
            self.uploads.cache.forget(self.app.key, self.user)
            self._files = await self._attachments()
        else:
            return False
        self._retried = True
        self._open(self._query())
        return True

    async def next_pieces(self):
        """The pieces from Dify's next batch of events (possibly none); None once the answer is complete."""
        translator = self.translator
        if self.pipeline.pending_error is not None:
            raise self.pipeline.pending_error
        if translator.done or self._cancelled:
            return None
        try:
            events = await self._next_events()
        except DifyError as error:
            if await self._retry(error):
                return await self.next_pieces()
            raise self._reported(error)
        except DifyTransportError as failure:
            raise self._reported(failure)
        if self._cancelled:
            return None
        if events is None:
            if translator.failure is not None:
                raise translator.failure
            raise upstream_broken(self.request.model, "ended its answer without finishing it")
        return self.pipeline.feed(events)

    async def _next_events(self):
        """The next events to translate: a long burst is taken a slice at a time, yielding to the loop
        between slices, so that other streams and requests are served while it is translated."""
        if self._backlog is not None:
            await asyncio.sleep(0)
            events, start = self._backlog, self._backlog_at
        else:
            events, start = await self._stream.next_events(), 0
            if events is None or len(events) <= _SLICE:
                return events
        end = start + _SLICE
        if end >= len(events):
            self._backlog = None
        else:
            self._backlog, self._backlog_at = events, end
        return events[start:end]

    @property
    def conversation_id(self):
        """The Dify conversation the client may continue; none for a background task (its own is deleted)."""
        return self.translator.conversation_id if self.conversational and self.task is None else None

    async def collect(self):
        """The whole answer, for a non-streaming client."""
        answer = Answer()
        while (pieces := await self.next_pieces()) is not None:
            answer.add(pieces)
        return answer

    def finish_reason(self):
        if self.pipeline.called_tools:
            return "function_call" if self.tool_request.legacy else "tool_calls"
        return self.translator.finish_reason()

    def usage(self):
        """Dify's usage figures, or an estimate from the text lengths when Dify reported none."""
        return usage_figures(self.translator.usage, self.query_length, self.pipeline.answer_length)

    @property
    def cancelled(self):
        return self._cancelled

    def cancel(self):
        """The client left: no run is started, and one under way is ended by `close`. A run whose task id
        is not known yet is closed only once its first event names the task (the reader then returns
        at once), so that Dify can still be told to stop it."""
        if self._cancelled:
            return
        self._cancelled = True
        stream = self._stream
        if stream is not None and (stream.task_id or self.translator.done):
            self.close()

    def close(self):
        """Ends the run, however the request ended (finished, failed, cancelled, timed out): the Dify
        stream is closed and, unless the answer finished, Dify's task is stopped. The request's one
        owner of the run calls it in a `finally`; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.task is not None and self.conversational and self.translator.conversation_id:
            IOLoop.current().spawn_callback(self._discard, self.translator.conversation_id)
        stream = self._stream
        if stream is None or self.translator.done and not self._cancelled:
            return  # a finished answer's response ends by itself, and its connection is reused
        stream.close()
        task_id = stream.task_id
        if task_id and not self.translator.done:
            self.stopping = asyncio.ensure_future(self._stop(task_id))

    async def _discard(self, conversation_id):
        """A background task's one-shot Dify conversation is deleted once answered: it must not litter the
        user's conversation list in Dify."""
        try:
            await self.dify.delete_conversation(self.app.key, conversation_id, self.user)
        except DifyFailure as error:
            log.warning("model %r: deleting a background task's Dify conversation failed (%s)", self.request.model,
                        error.label)

    async def _stop(self, task_id):
        reason = "client left" if self._cancelled else "answer ended early"
        try:
            await self.dify.stop(self.app.key, _STOP_KINDS.get(self.app.mode, "chat"), task_id, self.user)
            log.info("%s: stopped the Dify task of model %r", reason, self.request.model)
        except DifyFailure as error:
            log.warning("%s, and stopping the Dify task of model %r failed: %s", reason, self.request.model, error)

    def _reported(self, failure):
        """What the client sees of a Dify failure, counted by kind."""
        metrics.dify_error(failure.label)
        return from_dify_failure(failure, self.request.model)


class LocalAnswer(Completion):
    """A background task answered by the proxy itself (TASK_MODEL=local): no Dify run, no cost. `answer` is
    the text tasks.local_answer made for it when the handler chose to answer it here."""

    def __init__(self, answer, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local = answer
        self._answer_length = 0

    async def start(self):
        self.query_length = sum(len(content_text(m.get("content"), placeholders=False))
                                for m in self.request.messages)

    async def next_pieces(self):
        if self._local is None or self._cancelled:
            return None
        text, self._local = self._local, None
        self._answer_length = len(text)
        return [(CONTENT, text)]

    def usage(self):
        """Estimated from the chat it read and the answer it gave."""
        return usage_figures(None, self.query_length, self._answer_length)
