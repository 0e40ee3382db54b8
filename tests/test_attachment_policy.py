"""The attachment policy: the proxy's limits and the app's file settings, each breach a clear error
naming the file, before anything is uploaded.

End-to-end tests go through the real proxy to the fake Dify; the app's rules and the policy are
also tested directly.
"""

import pytest

import attachment_policy
from attachment_support import (DOCX, MB, PDF, chat, data_url, file_part, file_upload, harness_with, image,
                                nothing_sent, png, refused, user)
from apps import App
from config import ConfigError, settings_from
from errors import APIError
from fake_dify import default_parameters


def test_an_image_over_max_image_mb_is_413_naming_the_limit(make_harness):
    harness = make_harness(env={"MAX_IMAGE_MB": "1"})
    status, error = refused(harness, user(image(data_url(png(MB)))))
    assert status == 413 and error["code"] == "file_too_large" and error["param"] == "messages[0].content[1]"
    assert "MAX_IMAGE_MB" in error["message"] and "1 MB" in error["message"] and nothing_sent(harness)
    assert chat(harness, user(image(data_url(png(MB - 1000))))).startswith("Echo")


def test_size_is_judged_before_decoding(make_harness):
    harness = make_harness(env={"MAX_IMAGE_MB": "1"})
    not_even_base64 = "!" * (2 * MB)
    status, error = refused(harness, user(image(f"data:image/png;base64,{not_even_base64}")))
    assert status == 413 and error["code"] == "file_too_large"


def test_the_apps_own_smaller_limit_applies(make_harness):
    parameters = default_parameters("chat")
    parameters["system_parameters"]["image_file_size_limit"] = 1
    harness = harness_with(make_harness, parameters)
    status, error = refused(harness, user(image(data_url(png(MB)))))
    assert status == 413 and "Dify app's upload limit" in error["message"]


def test_too_many_files_for_the_server(make_harness):
    harness = make_harness(env={"MAX_FILES": "2"})
    status, error = refused(harness, user(*(image(data_url(png())) for _ in range(3))))
    assert status == 400 and error["code"] == "too_many_files" and "MAX_FILES" in error["message"]
    assert error["param"] == "messages[0].content[3]" and nothing_sent(harness)


def test_too_many_files_for_the_app(harness):
    status, error = refused(harness, user(*(image(f"https://example.com/{n}.png") for n in range(4))))
    assert status == 400 and error["code"] == "too_many_files" and "at most 3" in error["message"]


def test_uploads_disabled_on_the_app_is_400(make_harness):
    harness = harness_with(make_harness, file_upload(enabled=False))
    status, error = refused(harness, user(image("https://example.com/cat.png")))
    assert status == 400 and error["code"] == "file_uploads_disabled"
    assert "enable file upload" in error["message"] and nothing_sent(harness)


def test_an_app_without_file_settings_takes_no_files(make_harness):
    parameters = default_parameters("chat")
    parameters["file_upload"] = {"image": {"enabled": False, "number_limits": 3, "detail": "high",
                                           "transfer_methods": ["remote_url", "local_file"]}}
    harness = harness_with(make_harness, parameters)
    status, error = refused(harness, user(image(data_url(png()))))
    assert status == 400 and error["code"] == "file_uploads_disabled"


def test_a_type_the_app_does_not_allow_is_400(harness):
    status, error = refused(harness, user(file_part(PDF, "report.pdf")))
    assert status == 400 and error["code"] == "file_type_not_allowed"
    assert "'report.pdf'" in error["message"] and "only image" in error["message"] and nothing_sent(harness)


def test_a_method_the_app_does_not_allow_is_400(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_upload_methods=["local_file"]))
    status, error = refused(harness, user(image("https://example.com/cat.png")))
    assert status == 400 and error["code"] == "upload_method_not_allowed" and "base64" in error["message"]


def test_documents_go_as_documents_when_the_app_allows_them(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["image", "document"]))
    chat(harness, user(file_part(PDF, "Q3 report.pdf"), file_part(DOCX, "notes.docx", "application/octet-stream")))
    [sent] = harness.chat_bodies()
    assert [f["type"] for f in sent["files"]] == ["document", "document"]
    uploads = [harness.dify.uploads[f["upload_file_id"]] for f in sent["files"]]
    assert [(u.filename, u.mime, u.data) for u in uploads] == [
        ("Q3 report.pdf", "application/pdf", PDF),
        ("notes.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", DOCX)]
    assert "[file: Q3 report.pdf]" in sent["query"]


def test_documents_over_max_file_mb_are_413(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["document"]), env={"MAX_FILE_MB": "1"})
    status, error = refused(harness, user(file_part(PDF + bytes(MB), "big.pdf")))
    assert status == 413 and "'big.pdf'" in error["message"] and "MAX_FILE_MB" in error["message"]


def test_a_custom_extension_the_app_lists_goes_as_custom(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["custom"],
                                                     allowed_file_extensions=[".JSONL"]))
    chat(harness, user(file_part(b'{"a": 1}\n', "rows.jsonl", "application/jsonl")))
    [sent] = harness.chat_bodies()
    [upload] = harness.dify.uploads.values()
    assert sent["files"][0]["type"] == "custom" and upload.filename == "rows.jsonl"


def test_app_rules_read_dify_settings():
    rules = attachment_policy.app_rules(default_parameters("chat"))
    assert rules.enabled and rules.types == ("image",) and rules.number_limit == 3
    assert rules.methods == ("local_file", "remote_url") and rules.size_limit("image") == 10 * MB
    assert rules.size_limit("document") == 15 * MB and rules.size_limit("audio") == 50 * MB
    legacy = attachment_policy.app_rules({"file_upload": {"image": {"enabled": True, "number_limits": 2,
                                                        "transfer_methods": ["remote_url"]}}})
    assert legacy.enabled and legacy.types == ("image",) and legacy.methods == ("remote_url",)
    assert legacy.number_limit == 2
    assert not attachment_policy.app_rules({"opening_statement": ""}).enabled
    assert attachment_policy.app_rules({}) is None, "unknown settings: Dify decides"
    custom = attachment_policy.app_rules({"file_upload": {"enabled": True, "allowed_file_types": ["custom"],
                                              "allowed_file_extensions": [".PDF", "md"]}})
    assert custom.extensions == ("pdf", "md")


def policy(parameters=None, **limits):
    app = App("m", "m", "chat", "app-key", default_parameters("chat") if parameters is None else parameters)
    return attachment_policy.Policy(attachment_policy.Limits(**limits), app)


def test_policy_counts_before_reading_anything():
    parts = [("messages[0].content[%d]" % n, image("not even a url")) for n in range(4)]
    with pytest.raises(APIError) as caught:
        policy(files=3).check_count(parts)
    assert caught.value.code == "too_many_files" and caught.value.param == "messages[0].content[3]"
    with pytest.raises(APIError) as caught:
        policy(files=0).check_count(parts[:1])
    assert "MAX_FILES=0" in caught.value.message


def test_attachment_settings():
    base = {"DIFY_API_KEYS": "app-a", "DIFY_API_BASE": "https://dify.example/v1", "VALID_API_KEYS": "k"}
    settings = settings_from(base)
    assert (settings.max_image_bytes, settings.max_file_bytes, settings.max_files) == (10 * MB, 15 * MB, 10)
    assert (settings.upload_cache_size, settings.upload_cache_ttl) == (1000, 3600.0)
    assert attachment_policy.Limits.from_settings(settings_from({**base, "MAX_IMAGE_MB": "2", "MAX_FILES": "0"})) == \
        attachment_policy.Limits(2 * MB, 15 * MB, 0)
    for name, bad in (("MAX_IMAGE_MB", "0"), ("MAX_FILE_MB", "lots"), ("MAX_FILES", "-1"), ("UPLOAD_CACHE_TTL", "0")):
        with pytest.raises(ConfigError, match=name):
            settings_from({**base, name: bad})
