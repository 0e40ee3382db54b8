"""What may be attached to one request for one app, and how a refusal names the file.

The proxy has its own limits (MAX_IMAGE_MB, MAX_FILE_MB, MAX_FILES); a Dify app has its own
file settings (whether uploads are on, which types, by upload or by URL, how many, how big) and
silently drops a file they do not allow. Both are checked before a single byte is uploaded, and
each breach is an OpenAI-shaped error naming the file, the limit and what to change.
"""

from dataclasses import dataclass

from errors import APIError
from file_formats import AUDIO, CUSTOM, DOCUMENT, IMAGE

MB = 1024 * 1024
LOCAL, REMOTE = "local_file", "remote_url"


@dataclass(frozen=True)
class AppRules:
    """The file settings of a Dify app, from its /parameters (`file_upload`, `system_parameters`)."""

    enabled: bool
    types: tuple = ()
    methods: tuple = ()
    extensions: tuple = ()
    number_limit: int = 0
    max_bytes: tuple = ()

    def size_limit(self, kind):
        """The app's largest file of a kind in bytes, or None when it sets none."""
        return dict(self.max_bytes).get(kind)


def app_rules(parameters):
    """AppRules from a /parameters body; None when the proxy could not read it (Dify then decides)."""
    if not parameters:
        return None
    upload = parameters.get("file_upload") or {}
    system = parameters.get("system_parameters") or {}
    sizes = tuple((kind, int(system[key] * MB)) for kind, key in
                  ((IMAGE, "image_file_size_limit"), (DOCUMENT, "file_size_limit"), (AUDIO, "audio_file_size_limit"))
                  if isinstance(system.get(key), (int, float)) and system[key] > 0)
    if "enabled" not in upload and isinstance(upload.get("image"), dict):
        image = upload["image"]  # Dify before 0.10: an images-only setting
        return AppRules(bool(image.get("enabled")), (IMAGE,), tuple(image.get("transfer_methods") or ()),
                        (), _count(image.get("number_limits")), sizes)
    return AppRules(bool(upload.get("enabled")), tuple(upload.get("allowed_file_types") or ()),
                    tuple(upload.get("allowed_file_upload_methods") or ()),
                    tuple(e.lower().lstrip(".") for e in upload.get("allowed_file_extensions") or ()
                          if isinstance(e, str)),
                    _count(upload.get("number_limits")), sizes)


def _count(value):
    return value if isinstance(value, int) and value > 0 else 0


@dataclass(frozen=True)
class Limits:
    """The proxy's own limits (MAX_IMAGE_MB, MAX_FILE_MB, MAX_FILES)."""

    image_bytes: int = 10 * MB
    file_bytes: int = 15 * MB
    files: int = 10

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.max_image_bytes, settings.max_file_bytes, settings.max_files)


def megabytes(size):
    """A size in bytes as an error shows it: `2.5 MB`."""
    return f"{size / MB:.1f}".rstrip("0").rstrip(".") + " MB"


def file_error(status, code, where, message):
    """An attachment's error, pointing at the part (`messages[1].content[0]`) as its `param`."""
    return APIError(status, message, code=code, param=where)


def describe_file(kind, name, where, first=False):
    """How an error names a file: `the image 'cat.png' (messages[1].content[0])`."""
    noun = {IMAGE: "image", AUDIO: "audio"}.get(kind, "file")
    text = f"the {noun} '{name}' ({where})" if name else f"the {noun} in {where}"
    return "T" + text[1:] if first else text


class Policy:
    """What may be attached to one request for one app: the proxy's limits, narrowed by the app's settings."""

    def __init__(self, limits, app):
        self.limits = limits
        self.model = app.model_id
        self.rules = app_rules(app.parameters)

    def check_count(self, parts):
        """A 400 for more attachments than the proxy or the app takes, before any is read; `parts` are
        the (where, part) pairs of the new turn."""
        if not parts:
            return
        where = parts[0][0]
        rules = self.rules
        if rules is not None and not rules.enabled:
            raise file_error(400, "file_uploads_disabled", where,
                             f"The model '{self.model}' does not accept files: file upload is turned off for its Dify "
                             f"app. Remove the {len(parts)} attachment(s), starting with {where}, or enable file "
                             "upload (vision) in the app's features in Dify.")
        if self.limits.files == 0:
            raise file_error(400, "too_many_files", where,
                             "This server accepts no attachments (MAX_FILES=0); remove them, starting with "
                             f"{where}.")
        if len(parts) > self.limits.files:
            raise file_error(400, "too_many_files", parts[self.limits.files][0],
                             f"The new message has {len(parts)} attachments; this server accepts at most "
                             f"{self.limits.files} per request (MAX_FILES). Send fewer files.")
        if rules is not None and rules.number_limit and len(parts) > rules.number_limit:
            raise file_error(400, "too_many_files", parts[rules.number_limit][0],
                             f"The new message has {len(parts)} attachments; the Dify app behind model "
                             f"'{self.model}' accepts at most {rules.number_limit} per message. Send fewer files.")

    def max_bytes(self, kind):
        """(limit in bytes, what sets it) for a kind of file: the smaller of the proxy's and the app's."""
        own, setting = (self.limits.image_bytes, "MAX_IMAGE_MB") if kind == IMAGE else \
            (self.limits.file_bytes, "MAX_FILE_MB")
        app = self.rules.size_limit(kind) if self.rules is not None else None
        if app is not None and app < own:
            return app, f"the Dify app's upload limit for {'images' if kind == IMAGE else kind + ' files'}"
        return own, f"this server's limit for {'images' if kind == IMAGE else 'files'} ({setting})"

    def check_size(self, kind, size, name, where):
        """A 413 for a file over its limit; `size` is its decoded size in bytes."""
        limit, source = self.max_bytes(kind)
        if size > limit:
            raise file_error(413, "file_too_large", where,
                             f"{describe_file(kind, name, where, first=True)} is {megabytes(size)}, over {source} of "
                             f"{megabytes(limit)}. Send a smaller or compressed file.")

    def dify_type(self, kind, ext, method, name, where):
        """The Dify `type` for a file the app accepts; a 400 saying what it does accept otherwise."""
        rules = self.rules
        if rules is None:
            return kind
        what = describe_file(kind, name, where)
        if rules.methods and method not in rules.methods:
            how = ("as an uploaded file (base64)" if method == LOCAL
                   else "by URL (an http(s) image_url)")
            other = ("Send the image by URL instead." if method == LOCAL and REMOTE in rules.methods
                     else "Send it as base64 (a data: URL) instead." if LOCAL in rules.methods else "")
            raise file_error(400, "upload_method_not_allowed", where,
                             f"The Dify app behind model '{self.model}' does not accept files {how}: {what}. {other}"
                             .rstrip())
        if not rules.types or kind in rules.types:
            return kind
        if self.takes_custom(ext):
            return CUSTOM
        accepted = [t for t in rules.types if t != CUSTOM]
        if CUSTOM in rules.types and rules.extensions:
            accepted.append("." + ", .".join(rules.extensions) + " files")
        raise file_error(400, "file_type_not_allowed", where,
                         f"The Dify app behind model '{self.model}' does not accept {kind} files, only "
                         f"{' and '.join(accepted) or 'none'}: remove {what}, or allow {kind} files in the app's "
                         "file upload settings in Dify.")

    def takes_custom(self, ext):
        """Whether the app takes files of this extension as Dify's `custom` type."""
        return self.rules is not None and CUSTOM in self.rules.types and ext in self.rules.extensions
