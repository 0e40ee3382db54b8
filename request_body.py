"""A request body taken as it arrives, within MAX_REQUEST_MB, and parsed once it is whole.

Separate from the handlers because the limit is a protocol of its own with Tornado's stream
(`stream_request_body`): a refusal must keep a pooled connection usable, and a large body is
decoded off the event loop.
"""

from tornado.ioloop import IOLoop

from errors import APIError
from openai_api import LARGE_BODY_BYTES, parse_body


class BoundedBody:
    """Takes a request body as it arrives and refuses one over MAX_REQUEST_MB with a 413 in OpenAI shape,
    having buffered no more than the limit (Tornado's own limit would answer a bare 400 and hang up).

    A request refused before its body was read (a wrong key, a body too large) keeps its connection
    usable: SDKs pool connections, and a response sent while the body is still arriving leaves the
    rest of the body to be read as the next request (or the connection reset under the client). So
    a body of declared length up to twice MAX_REQUEST_MB is read and dropped and the error answered
    after it; a larger or chunked one is answered at once with `Connection: close`."""

    refusal = None
    body_read = False
    answered = False

    def prepare(self):
        self.request.connection.set_max_body_size(_UNLIMITED)  # the limit is enforced here instead
        self.request.body = bytearray()
        limit = self.proxy.settings.max_request_bytes
        declared = self.request.headers.get("Content-Length", "")
        declared = int(declared) if declared.isdigit() else None
        try:
            super().prepare()
            if declared is not None and declared > limit:
                raise body_too_large(limit)
        except APIError as error:
            if declared is None or declared > 2 * limit:
                raise
            self.refusal = error

    def data_received(self, chunk):
        if self.refusal is not None:
            return  # a refused body of a declared, bounded length: read and dropped
        limit = self.proxy.settings.max_request_bytes
        if len(self.request.body) + len(chunk) > limit:  # only a chunked body, of no declared length, gets here
            if not self.answered:
                self.answered = True
                self.send_error(413, exc_info=(APIError, body_too_large(limit), None))
        else:
            self.request.body += chunk

    async def read_request(self, parse_request):
        """The request parsed from the whole body by `parse_request` (a refusal found while the body was
        arriving is answered now). A large body is decoded in an executor thread, so that other requests
        keep flowing while it is parsed (see openai_api.parse_body)."""
        self.body_read = True
        if self.refusal is not None:
            raise self.refusal
        raw = self.request.body
        if len(raw) <= LARGE_BODY_BYTES:
            return parse_request(parse_body(raw))
        return await IOLoop.current().run_in_executor(None, lambda: parse_request(parse_body(raw)))

    def write_error(self, status_code, **kwargs):
        if not self.body_read:
            self.set_header("Connection", "close")  # the rest of the body is not read: this connection ends
        super().write_error(status_code, **kwargs)


_UNLIMITED = 1 << 62


def body_too_large(limit):
    return APIError(413, f"The request body is larger than this server's limit of {limit // (1024 * 1024)} MB "
                         "(MAX_REQUEST_MB). Send smaller or fewer attachments.", code="request_too_large")
