"""The HTTP server on loopback, with real clients: the official `openai` client for images and
chat (plain and streamed), httpx for the rest. Few steps per image, so the tier stays fast."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from runtime.server.app import ServerConfig  # noqa: E402
from runtime.server.local import local_server  # noqa: E402

FAST = {"num_inference_steps": 2, "decoder_num_inference_steps": 3}


@pytest.fixture(scope="module")
def gen(tiny_engine_dir):
    from runtime.generator import Generator

    with Generator.from_dir(tiny_engine_dir) as g:
        yield g


@pytest.fixture(scope="module")
def url(tiny_engine_dir):
    with local_server(ServerConfig(engines=tiny_engine_dir)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


def test_openai_images_equal_the_runtime(client, gen):
    out = client.images.generate(
        model="blip3o-tiny-fp32",
        prompt="a red circle",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 7, **FAST},
    )
    assert len(out.data) == 2
    expected = gen.generate("a red circle", seed=7, steps=2, decoder_steps=3, num_images=2)
    for item, ref in zip(out.data, expected):
        assert np.array_equal(png(item.b64_json), np.asarray(ref))
    assert out.usage.input_tokens > 0


def test_the_sampler_extension_equals_the_runtime(client, gen):
    settings = {"sampler": "heun", "decoder_sampler": "dpmpp_2m"}
    out = client.images.generate(
        model="blip3o-tiny-fp32",
        prompt="a red circle",
        response_format="b64_json",
        extra_body={"seed": 2, **FAST, **settings},
    )
    expected = gen.generate("a red circle", seed=2, steps=2, decoder_steps=3, **settings)
    assert np.array_equal(png(out.data[0].b64_json), np.asarray(expected[0]))


def test_openai_images_stream(client, gen):
    events = list(
        client.images.generate(
            prompt="a blue square",
            stream=True,
            partial_images=2,
            extra_body={"seed": 3, **FAST},
        )
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    ref = gen.generate("a blue square", seed=3, steps=2, decoder_steps=3)[0]
    assert np.array_equal(png(events[-1].b64_json), np.asarray(ref))


def test_openai_chat_plain_and_streamed(client, gen):
    image = gen.generate("a red circle", seed=0, steps=2, decoder_steps=3)[0]
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": content}]
    ref = gen.answer(image, "Describe the image.", max_new_tokens=8)
    out = client.chat.completions.create(model="blip3o-tiny-fp32", messages=messages, max_tokens=8)
    choice = out.choices[0]
    assert choice.message.content == ref
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if out.usage.completion_tokens < 8:
        assert choice.finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="blip3o-tiny-fp32",
            messages=messages,
            max_completion_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_chat_samples_with_temperature_top_p_and_seed(client, gen):
    """The runtime's seeded sampling through the API: the same answer as the Generator's."""
    image = gen.generate("a blue square", seed=1, steps=2, decoder_steps=3)[0]
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]
    options = dict(temperature=1.5, top_p=0.95, seed=7)
    ref = gen.answer(image, "Describe the image.", max_new_tokens=8, **options)
    out = client.chat.completions.create(
        model="blip3o-tiny-fp32", messages=[{"role": "user", "content": content}], max_tokens=8,
        **options,
    )  # fmt: skip
    assert out.choices[0].message.content == ref


def test_chat_stream_ends_in_done(url, gen):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    body = {
        "stream": True,
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour?"},
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                ],
            }
        ],
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [
        (
            "images/generations",
            {"prompt": "x", "num_inference_steps": 0},
            400,
            "num_inference_steps",
            "got 0",
        ),
        (
            "images/generations",
            {"prompt": "x", "guidance_scale": "high"},
            400,
            "guidance_scale",
            'guidance_scale must be a number, got "high"',
        ),
        ("images/generations", {"prompt": "x", "n": 99}, 400, "n", "got 99"),
        (
            "images/generations",
            {"prompt": "x", "decoder_sampler": "ddim"},
            400,
            "decoder_sampler",
            "one of euler, dpmpp_2m, got 'ddim'",
        ),
        ("images/generations", {"prompt": "x", "preset": "turbo"}, 400, "preset", "'turbo'"),
        ("images/generations", {"prompt": "x", "seed": -1}, 400, "seed", "got -1"),
        ("images/generations", {"prompt": ""}, 400, "prompt", "empty"),
        ("images/generations", {"prompt": "x", "size": "1024x1024"}, 400, "size", "64x64"),
        (
            "images/generations",
            {"prompt": "x", "response_format": "url"},
            400,
            "response_format",
            "'url'",
        ),
        ("images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model", "dall-e-3"),
        ("images/generations", {"prompt": "x", "partial_images": 9}, 400, "partial_images", "9"),
        ("images/generations", {"prompt": "x " * 3000}, 400, "prompt", "tokens"),
        ("chat/completions", {"messages": []}, 400, "messages", "non-empty"),
        (
            "chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                        ],
                    }
                ]
            },
            400,
            "messages",
            "--allow-remote-images",
        ),
        (
            "chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            }
                        ],
                    }
                ]
            },
            400,
            "messages",
            "cannot read the image",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "no image"}]},
            400,
            "messages",
            "exactly one image",
        ),
        (
            "chat/completions",
            {
                "temperature": 500,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            }
                        ],
                    }
                ],
            },
            400,
            "temperature",
            "temperature must be a finite number in [0, 100], got 500",
        ),
    ],
)
def test_user_errors_are_openai_shaped(url, path, body, status, param, words):
    r = httpx.post(f"{url}/v1/{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"] and "\n" not in err["message"]
    assert err["param"] == param


def test_bad_json_and_unknown_route(url):
    r = httpx.post(f"{url}/v1/images/generations", content=b"{nope", timeout=10)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/images/generations", content=b"[1]", timeout=10)
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_health_models_metrics(url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/health/live").status_code == 200
    ready = httpx.get(f"{url}/v1/health/ready")
    assert ready.status_code == 200 and ready.headers["x-replica"]
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["blip3o-tiny-fp32"]
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "blip3o_queue_depth",
        "blip3o_running",
        "blip3o_batch_size",
        "blip3o_step_seconds",
        "blip3o_request_seconds",
        "blip3o_cancels_total",
        "blip3o_rejections",
    ):
        assert name in text, name
    assert 'blip3o_step_seconds_count{stage="unet"}' in text


def test_job_api_with_idempotency(url, gen):
    body = {"prompt": "a green triangle", "seed": 5, **FAST}
    headers = {"Idempotency-Key": "job-a"}
    first = httpx.post(f"{url}/v1/images/jobs", json=body, headers=headers, timeout=10)
    again = httpx.post(f"{url}/v1/images/jobs", json=body, headers=headers, timeout=10)
    assert first.status_code == again.status_code == 202
    job = first.json()["id"]
    assert again.json()["id"] == job
    other = httpx.post(f"{url}/v1/images/jobs", json={**body, "seed": 6}, headers=headers)
    assert other.status_code == 409
    deadline = time.monotonic() + 60
    while (s := httpx.get(f"{url}/v1/images/jobs/{job}").json())["status"] != "succeeded":
        assert s["status"] in ("queued", "running") and time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["steps_done"] == s["steps_total"] == 1 + 2 + 3 + 1 and s["stage"] == "done"
    content = httpx.get(f"{url}/v1/images/jobs/{job}/content").json()
    ref = gen.generate("a green triangle", seed=5, steps=2, decoder_steps=3)[0]
    assert np.array_equal(png(content["data"][0]["b64_json"]), np.asarray(ref))
    assert httpx.get(f"{url}/v1/images/jobs/nope").status_code == 404


def test_job_cancel(url):
    body = {"prompt": "slow", "num_inference_steps": 2, "decoder_num_inference_steps": 1000}
    job = httpx.post(f"{url}/v1/images/jobs", json=body).json()["id"]
    r = httpx.get(f"{url}/v1/images/jobs/{job}/content")
    assert r.status_code == 409 and r.headers["retry-after"]
    before = metric(url, "blip3o_cancels_total")
    assert httpx.post(f"{url}/v1/images/jobs/{job}/cancel").status_code == 200
    deadline = time.monotonic() + 30
    while (s := httpx.get(f"{url}/v1/images/jobs/{job}").json())["status"] != "cancelled":
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["steps_done"] < s["steps_total"]
    assert metric(url, "blip3o_cancels_total") == before + 1


def test_client_disconnect_cancels_between_steps(url):
    before = metric(url, "blip3o_cancels_total")
    body = {"prompt": "slow", "num_inference_steps": 2, "decoder_num_inference_steps": 1000}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/images/generations", json=body, timeout=0.5)
    deadline = time.monotonic() + 30
    while metric(url, "blip3o_cancels_total") < before + 1:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)
    assert metric(url, "blip3o_running") == 0


def test_full_queue_sheds_with_retry_after(tiny_engine_dir):
    config = ServerConfig(engines=tiny_engine_dir, max_running=1, max_queue=1)
    body = {"prompt": "slow", "num_inference_steps": 2, "decoder_num_inference_steps": 1000}
    with local_server(config) as base:
        codes = [httpx.post(f"{base}/v1/images/jobs", json=body) for _ in range(4)]
        assert [r.status_code for r in codes[:2]] == [202, 202]
        shed = codes[2:]
        assert all(r.status_code == 429 and int(r.headers["retry-after"]) >= 1 for r in shed)
        assert shed[0].json()["error"]["code"] == "queue_full"
        assert metric(base, "blip3o_rejections_total") == 2
        for r in codes[:2]:
            httpx.post(f"{base}/v1/images/jobs/{r.json()['id']}/cancel")


def test_not_ready_is_503(tiny_engine_dir):
    gate = threading.Event()
    from runtime.server import state as state_module

    start = state_module.State.start

    def slow_start(self):
        gate.wait(30)
        start(self)

    state_module.State.start = slow_start
    try:
        with local_server(ServerConfig(engines=tiny_engine_dir), wait_ready=False) as base:
            deadline = time.monotonic() + 10
            while True:
                try:
                    live = httpx.get(f"{base}/v1/health/live")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert live.status_code == 200
            r = httpx.get(f"{base}/v1/health/ready")
            assert r.status_code == 503 and r.headers["retry-after"]
            r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            gate.set()
    finally:
        state_module.State.start = start
        gate.set()


def test_serve_without_the_extra_is_one_line(monkeypatch, capsys):
    from runtime import cli
    from runtime.server import cli as serve_cli

    real = serve_cli.importlib.util.find_spec
    monkeypatch.setattr(
        serve_cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fastapi" else real(name, *a),
    )
    assert cli.main(["serve", "--engines", "engines"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blip3o-edge[serve]" in err


def test_runtime_import_does_not_load_fastapi():
    import subprocess
    import sys

    code = (
        "import runtime.cli, runtime.server.cli, sys; "
        "runtime.cli.build_parser(); sys.exit('fastapi' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
