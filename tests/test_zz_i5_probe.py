import json, socket, openai, pytest

def test_probe(make_harness):
    h = make_harness(env={"MAX_REQUEST_MB": "1"})
    for size in (1_200_000, 3_000_000, 30_000_000):
        big = "x" * size
        try:
            h.client().chat.completions.create(model="Chat Bot", messages=[{"role": "user", "content": big}])
            print(size, "no error")
        except openai.APIStatusError as e:
            print(size, "status", e.status_code, e.body)
        except Exception as e:
            print(size, "other", type(e), e)
    # raw chunked
    s = socket.create_connection(("127.0.0.1", h.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key-one\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
    try:
        for i in range(40):
            s.sendall(b"%x\r\n" % 65536 + b"y" * 65536 + b"\r\n")
    except Exception as e:
        print("send failed", e)
    try:
        print("chunked resp", s.recv(2000))
    except Exception as e:
        print("recv failed", e)
