"""Base64 and data URLs: decoded strictly, measured exactly before decoding."""

import base64

import pytest

import data_urls


def test_strict_base64():
    assert data_urls.decode_base64("QUJD") == b"ABC" and data_urls.decode_base64("QQ==") == b"A"
    for bad in ("QQ", "QQ=", "Q Q==", "QUJD\n", "-_8=", "QQ==QQ==", "=QQ=", "é===", "QU\u00a0D"):
        with pytest.raises(ValueError):
            data_urls.decode_base64(bad)


@pytest.mark.parametrize("payload", ["", "QQ==", "QUI=", "QUJD", "QUJDRA==", base64.b64encode(bytes(1000)).decode()])
def test_decoded_size_is_exact_before_decoding(payload):
    assert data_urls.decoded_size(payload) == len(base64.b64decode(payload))
    assert data_urls.decoded_size("data:;base64," + payload, 13) == len(base64.b64decode(payload))


def test_large_base64_decodes_in_pieces_and_padding_mid_way_is_refused():
    data = bytes(range(256)) * 4000
    text = base64.b64encode(data).decode()
    assert len(text) > 2 * data_urls._DECODE_CHUNK and data_urls.decode_base64(text) == data
    with pytest.raises(ValueError, match="after its '=' padding"):
        data_urls.decode_base64(text[:data_urls._DECODE_CHUNK - 4] + "QQ==" + text[data_urls._DECODE_CHUNK:])


def test_parse_data_url():
    parsed = data_urls.parse_data_url("data:Image/PNG;name=my%20cat.png;charset=x;base64,QUJD")
    assert (parsed.mime, parsed.name, parsed.text[parsed.start:]) == ("image/png", "my cat.png", "QUJD")
    assert data_urls.decode_base64(parsed.text, parsed.start) == b"ABC"
    assert data_urls.decoded_size(parsed.text, parsed.start) == 3
    assert data_urls.parse_data_url("data:;base64,QQ==").mime == ""
    for bad in ("data:image/png,QUJD", "data:image/png;base64", "data:text/plain;charset=utf-8,hi"):
        with pytest.raises(ValueError):
            data_urls.parse_data_url(bad)
