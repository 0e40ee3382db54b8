"""File formats: an image is what its bytes are, whatever its name says; filenames Dify accepts."""

import pytest

import file_formats
from attachment_support import GIF, JPEG, PDF, WAV, WEBP, png


@pytest.mark.parametrize("data, ext", [(png(), "png"), (JPEG, "jpg"), (WEBP, "webp"), (GIF, "gif"),
                                       (b"GIF87a" + GIF[6:], "gif")], ids=["png", "jpeg", "webp", "gif89a", "gif87a"])
def test_sniff_image(data, ext):
    assert file_formats.sniff_image(data).ext == ext


@pytest.mark.parametrize("data", [b"", PDF, WAV, b"RIFF\0\0\0\0WEBX", b"\x89PNG\r\n", b"<svg/>", b"BM\0\0"],
                         ids=["empty", "pdf", "wav", "riff", "png-cut", "svg", "bmp"])
def test_sniff_image_refuses_what_is_not_a_supported_image(data):
    assert file_formats.sniff_image(data) is None


@pytest.mark.parametrize("name, safe", [("C:\\Users\\me\\photo.png", "photo.png"), ("../../etc/passwd", "passwd"),
                                        ('a:b*c?"d<e>f|g.txt', "a_b_c__d_e_f_g.txt"), ("  .hidden. ", "hidden"),
                                        ("x" * 300 + ".pdf", "x" * 116 + ".pdf"), ("tab\there.md", "tab_here.md")])
def test_safe_filename(name, safe):
    assert file_formats.safe_filename(name) == safe
