"""Image URLs into the operator's network are refused before Dify sees them (issue 14.15).

No test here sends a packet beyond loopback: addresses are literals, `localhost` resolves from
/etc/hosts, and the harness's resolver gives other names a public address nothing contacts.
"""

import asyncio
import json

import pytest

from url_guard import URLGuard, system_resolver

CHAT = "Chat Bot"


def ask(harness, url):
    body = {"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    status, _, raw = harness.raw("POST", "/v1/chat/completions", body)
    return status, json.loads(raw)


INSIDE = [
    "http://127.0.0.1:22/", "http://127.1/x.png", "http://2130706433/x.png", "http://0x7f000001/x.png",
    "http://017700000001/x.png", "http://0177.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.5/a.png", "http://192.168.1.1/a.png", "http://172.16.0.1/a.png", "http://100.64.0.1/a.png",
    "http://0.0.0.0/a.png", "http://[::1]/a.png", "http://[::ffff:127.0.0.1]/a.png", "http://[fe80::1]/a.png",
    "http://[fd00::1]/a.png", "http://[64:ff9b::a9fe:a9fe]/a.png", "http://localhost:8080/a.png",
    "http://user@example.com/a.png", "http://example.com@127.0.0.1/a.png", "http://127.0.0.1\\@example.com/a.png",
    "https://localhost./a.png",
]


@pytest.mark.parametrize("url", INSIDE)
def test_urls_into_the_operators_network_are_refused(harness, url):
    status, body = ask(harness, url)
    assert status == 400 and body["error"]["code"] in ("url_not_allowed", "invalid_image_url"), body
    assert body["error"]["param"] == "messages[0].content[1]"
    assert not harness.dify.requests_to("/chat-messages") and not harness.dify.requests_to("/files/upload")


def test_the_refusal_says_what_and_how(harness):
    status, body = ask(harness, "http://169.254.169.254/latest/meta-data/")
    message = body["error"]["message"]
    assert "169.254.169.254" in message and "link-local" in message and "ALLOW_PRIVATE_URLS" in message


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://93.184.216.34/cat.png",
                                 "http://[2606:4700::1111]/cat.png"])
def test_public_urls_still_go_to_dify(harness, url):
    status, body = ask(harness, url)
    assert status == 200, body
    [sent] = harness.chat_bodies()
    assert sent["files"] == [{"type": "image", "transfer_method": "remote_url", "url": url}]


def test_allow_private_urls_lets_operators_reach_private_addresses(make_harness):
    harness = make_harness(env={"ALLOW_PRIVATE_URLS": "on"})
    status, body = ask(harness, "http://10.0.0.5/a.png")
    assert status == 200, body
    assert harness.chat_bodies()[0]["files"][0]["url"] == "http://10.0.0.5/a.png"


def test_a_name_is_refused_when_any_of_its_addresses_is_inside():
    async def resolver(host, port):
        return ["93.184.216.34", "10.1.2.3"]

    with pytest.raises(Exception) as refused:
        asyncio.run(URLGuard(resolve=resolver).check("w", "https://mixed.example/a.png"))
    assert refused.value.status_code == 400 and "10.1.2.3" in refused.value.message


def test_a_name_that_does_not_resolve_or_resolves_slowly_is_refused():
    async def nothing(host, port):
        raise OSError("no such host")

    async def slow(host, port):
        await asyncio.sleep(10)

    for resolver in (nothing, slow):
        with pytest.raises(Exception) as refused:
            asyncio.run(URLGuard(resolve=resolver, timeout=0.2).check("w", "https://gone.example/a.png"))
        assert refused.value.status_code == 400 and "does not resolve" in refused.value.message


def test_the_system_resolver_finds_localhost_inside():
    with pytest.raises(Exception) as refused:
        asyncio.run(URLGuard(resolve=system_resolver).check("w", "http://localhost/a.png"))
    assert "loopback" in refused.value.message
