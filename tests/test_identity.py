"""identity.py: a client's opaque ids."""

from identity import client_id, dify_user


def test_dify_user_is_opaque_and_per_client():
    secret = b"s" * 32
    one, two = client_id(secret, "sk-one"), client_id(secret, "sk-two")
    assert one != two and "sk-one" not in dify_user(one)
    assert dify_user(one, "alice") != dify_user(two, "alice")
    assert dify_user(one, "alice").endswith(":alice")
