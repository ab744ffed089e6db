"""Hostile and careless requests to the HTTP server end in one OpenAI-shaped JSON answer, never a
plain-text 500 or a traceback: JSON the parser chokes on, text that is not Unicode, images no
decoder takes, bodies too large, wrong methods, and bugs (a route that raises is a JSON 500,
logged once; a stream that fails ends in an `error` event). Every image carries its seed."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from runtime.server.app import ServerConfig  # noqa: E402
from runtime.server.local import local_server  # noqa: E402

FAST = {"num_inference_steps": 1, "decoder_num_inference_steps": 1}


@pytest.fixture(scope="module")
def url(tiny_engine_dir):
    with local_server(ServerConfig(engines=tiny_engine_dir, threads=1)) as base:
        yield base


def post(url: str, path: str, content: bytes | str, **kw) -> httpx.Response:
    data = content.encode() if isinstance(content, str) else content
    return httpx.post(f"{url}{path}", content=data, timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chat_body(image: bytes, question: str = "What is it?") -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"max_tokens": 2, "messages": [{"role": "user", "content": content}]}


# ---- class 3: JSON the parser chokes on ---------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        "[" * 50_000 + "]" * 50_000,  # RecursionError in json
        '{"prompt": "x", "extra": ' + "[" * 5000 + "]" * 5000 + "}",  # deep, inside a field
        '{"prompt": "x", "seed": ' + "9" * 5000 + "}",  # past Python's integer digit limit
        '{"prompt": "x", "guidance_scale": NaN}',
        '{"prompt": "x", "guidance_scale": Infinity}',
        "",
        "{nope",
        "[1]",
        b'{"prompt": "\xff\xfe"}',  # not UTF-8
    ],
)
@pytest.mark.parametrize(
    "path", ["/v1/images/generations", "/v1/images/jobs", "/v1/chat/completions"]
)
def test_bodies_the_parser_chokes_on_are_400(url, path, body):
    assert_openai_error(post(url, path, body), 400)


def test_big_numbers_are_the_params_400(url):
    r = post(url, "/v1/images/generations", '{"prompt": "x", "seed": ' + "9" * 100 + "}")
    assert "seed must be in" in assert_openai_error(r, 400, "seed")["message"]
    r = post(url, "/v1/images/generations", '{"prompt": "x", "guidance_scale": 1e400}')
    assert "guidance_scale must be a finite number" in assert_openai_error(r, 400)["message"]


# ---- class 4: text that is not valid Unicode ----------------------------------------------------
def test_a_lone_surrogate_in_a_prompt_is_400_naming_it(url):
    for path in ("/v1/images/generations", "/v1/images/jobs"):
        r = post(url, path, '{"prompt": "a red \\ud800 circle"}')
        assert "not valid Unicode" in assert_openai_error(r, 400, "prompt")["message"]
    for stream in (False, True):
        r = post(url, "/v1/images/generations", json.dumps({"prompt": "\udcff", "stream": stream}))
        assert_openai_error(r, 400, "prompt")


def test_a_lone_surrogate_in_a_question_is_400_naming_messages(url):
    for stream in (False, True):
        body = {**chat_body(png_bytes(), "what \udcff is it?"), "stream": stream}
        r = post(url, "/v1/chat/completions", json.dumps(body))
        assert "not valid Unicode" in assert_openai_error(r, 400, "messages")["message"]


def test_surrogates_echoed_in_errors_stay_json(url):
    r = post(url, "/v1/images/generations", '{"prompt": "x", "model": "\\ud83d"}')
    assert_openai_error(r, 404, "model")
    r = post(url, "/v1/images/generations", '{"prompt": "x", "size": "\\udfff"}')
    assert_openai_error(r, 400, "size")
    r = httpx.get(f"{url}/v1/images/jobs/%ED%A0%80", timeout=10)  # a surrogate's UTF-8 bytes
    assert_openai_error(r, 404)


# ---- class 2: images no decoder takes -----------------------------------------------------------
def broken_images() -> dict[str, bytes]:
    good = png_bytes()
    big_text = chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * (2 << 20)))
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, format="GIF")
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    return {
        "oversized text chunk (ValueError)": good[:33] + big_text + good[33:],
        "truncated": good[: len(good) // 2],
        "corrupt IDAT": good[:40] + b"\x00" * 20 + good[60:],
        "huge declared size": good[:16] + struct.pack(">II", 1 << 20, 1 << 20) + good[24:],
        "gif cut": gif.getvalue()[:20],
        "tiff cut": tiff.getvalue()[:60],
        "not an image": b"hello",
        "empty": b"",
    }


@pytest.mark.parametrize("name", list(broken_images()))
def test_images_no_decoder_takes_are_400(url, name):
    r = post(url, "/v1/chat/completions", json.dumps(chat_body(broken_images()[name])))
    message = assert_openai_error(r, 400, "messages")["message"]
    assert message.startswith(("cannot read the image", "the image")), message


# ---- the guard: body size, methods, bugs ---------------------------------------------------------
def test_a_body_over_the_limit_is_413(url):
    from runtime.server.errors import MAX_BODY_BYTES

    r = post(url, "/v1/chat/completions", b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert_openai_error(r, 413)


def test_unknown_methods_and_routes_are_json(url):
    r = httpx.delete(f"{url}/v1/models", timeout=10)
    assert_openai_error(r, 405)
    assert_openai_error(httpx.get(f"{url}/v1/nothing", timeout=10), 404)


def errors_logged(caplog) -> list:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def test_a_bug_in_a_route_is_a_json_500_logged_once(url, monkeypatch, caplog):
    from runtime.server import protocol

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(protocol, "images_body", boom)
    caplog.set_level(logging.ERROR)
    r = post(url, "/v1/images/generations", json.dumps({"prompt": "a red circle", **FAST}))
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "ZeroDivisionError" in err["message"] and "a bug" not in err["message"]
    assert r.headers["x-replica"]
    assert len(errors_logged(caplog)) == 1, [r.getMessage() for r in caplog.records]


def test_a_bug_inside_a_stream_ends_it_with_an_error_event(url, monkeypatch, caplog):
    from runtime.server import protocol

    def boom(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(protocol, "image_event", boom)
    caplog.set_level(logging.ERROR)
    body = {"prompt": "a red circle", "stream": True, **FAST}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("}") and "event: error" in text, text
    error = json.loads(text.split("event: error\ndata: ")[1].split("\n")[0])["error"]
    assert error["code"] == "internal_error"
    assert len(errors_logged(caplog)) == 1


# ---- every image carries its seed ----------------------------------------------------------------
def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_every_image_says_its_seed_and_the_seed_reproduces_it(url):
    body = {"prompt": "a red circle", "n": 2, **FAST}
    first = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).json()
    seeds = {item["seed"] for item in first["data"]}
    assert len(seeds) == 1  # one noise draw for the batch
    seed = seeds.pop()
    again = httpx.post(f"{url}/v1/images/generations", json={**body, "seed": seed}, timeout=60)
    for a, b in zip(first["data"], again.json()["data"]):
        assert b["seed"] == seed and np.array_equal(png(a["b64_json"]), png(b["b64_json"]))
    other = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).json()
    assert other["data"][0]["seed"] != seed  # picked anew per request


def test_the_job_content_and_the_stream_carry_the_seed(url):
    body = {"prompt": "a blue square", "seed": 11, **FAST}
    job = httpx.post(f"{url}/v1/images/jobs", json=body, timeout=60).json()["id"]
    for _ in range(600):
        r = httpx.get(f"{url}/v1/images/jobs/{job}/content", timeout=60)
        if r.status_code == 200:
            break
        assert r.status_code == 409
    assert r.json()["data"][0]["seed"] == 11
    stream = {**body, "stream": True}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=stream, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert json.loads(lines[-1][6:])["seed"] == 11


def test_max_steps_bounds_requests(tiny_engine_dir):
    """`max_steps` refuses a request that asks for more, and caps the folder's defaults."""
    config = ServerConfig(engines=tiny_engine_dir, threads=1, max_steps=3, warmup=False)
    with local_server(config) as base:
        r = httpx.post(f"{base}/v1/images/jobs", json={"prompt": "x", "preset": "fast"}, timeout=60)
        assert r.status_code == 202 and r.json()["steps_total"] == 1 + 3 + 3 + 1, r.text
        r = httpx.post(
            f"{base}/v1/images/generations",
            json={"prompt": "x", "num_inference_steps": 4},
            timeout=60,
        )
        message = assert_openai_error(r, 400, "num_inference_steps")["message"]
        assert "[1, 3] on this server, got 4" in message
        r = httpx.post(
            f"{base}/v1/images/generations",
            json={"prompt": "x", "num_inference_steps": 2, "decoder_num_inference_steps": 4},
            timeout=60,
        )
        assert_openai_error(r, 400, "decoder_num_inference_steps")
        schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]
        steps = schema["ImageRequest"]["properties"]["num_inference_steps"]["anyOf"][0]
        assert steps["maximum"] == 3
