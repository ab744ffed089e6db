"""`/openapi.json` is the server's true contract: request bodies for every POST, every status
code and content type the server answers, the request models derived from the params
dataclasses (a params field neither exposed nor excused fails here), and schemathesis fuzzing
the live server from that schema with all its checks (no 5xx, statuses and content types as
documented, 4xx OpenAI-shaped, the server healthy after, no job left open)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from runtime.params import AnswerParams, GeneratorParams, field_info  # noqa: E402
from runtime.server.app import ServerConfig  # noqa: E402
from runtime.server.local import local_server  # noqa: E402
from runtime.server.models import (  # noqa: E402
    CHAT_FIELDS,
    IMAGE_FIELDS,
    NOT_EXPOSED,
    api_names,
    chat_request_model,
    image_request_model,
)
from runtime.server.state import State  # noqa: E402

TOML = Path(__file__).with_name("schemathesis.toml")


# ---- the request models are the params dataclasses' fields ---------------------------------
@pytest.mark.parametrize(
    ("cls", "renamed", "model"),
    [
        (GeneratorParams, IMAGE_FIELDS, image_request_model()),
        (AnswerParams, CHAT_FIELDS, chat_request_model()),
    ],
)
def test_every_params_field_is_in_the_request_model_or_excused(cls, renamed, model):
    """A field added to a params class must reach the API (under its own name, or one the
    mapping table gives) or be listed in NOT_EXPOSED with the reason."""
    names = api_names(cls, renamed)  # API field -> params field
    reached = set(names.values())
    for name, info in field_info(cls).items():
        if name in NOT_EXPOSED[cls]:
            assert NOT_EXPOSED[cls][name].strip(), f"{name}: say why it is not exposed"
            continue
        assert name in reached, f"{cls.__name__}.{name} is neither exposed nor excused"
        for api in [a for a, p in names.items() if p == name]:
            assert api in model.model_fields, api
            schema = model.model_json_schema()["properties"][api]["anyOf"][0]
            if info["kind"] is str:
                assert schema.get("enum", list(info["choices"] or [])) == list(
                    info["choices"] or schema.get("enum", [])
                )
            else:
                low, high = info["range"]
                assert schema["minimum"] >= low and schema["maximum"] <= high, (api, schema)
    for api in renamed:
        assert api in model.model_fields, f"the mapping names {api}, the model lacks it"


def test_a_new_params_field_reaches_the_model(monkeypatch):
    """The derivation itself: a field the params class gains appears in the request model."""
    from runtime.server import models

    info = dict(field_info(GeneratorParams))
    info["eta"] = {"kind": float, "range": (0.0, 1.0), "help": "new", "default": None}
    monkeypatch.setattr(models, "field_info", lambda cls: info if cls is GeneratorParams else {})
    monkeypatch.setitem(models.NOT_EXPOSED, GeneratorParams, {})
    assert "eta" in models.image_request_model().model_fields


def test_a_renamed_field_error_names_the_api_field(tiny_engine_dir):
    with local_server(ServerConfig(engines=tiny_engine_dir, threads=1, warmup=False)) as url:
        for api, value in (("n", 99), ("num_inference_steps", 0), ("guidance_scale", 11.0)):
            r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", api: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == api, r.text
            assert r.json()["error"]["message"].startswith(api)
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        message = {"role": "user", "content": [part]}
        body = {"max_completion_tokens": 0, "messages": [message]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.json()["error"]["param"] == "max_completion_tokens", r.text


# ---- the OpenAPI document ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def openapi(tiny_engine_dir):
    with local_server(ServerConfig(engines=tiny_engine_dir, threads=1, warmup=False)) as url:
        yield httpx.get(f"{url}/openapi.json").json()


def test_every_post_documents_its_request_body(openapi):
    schemas = openapi["components"]["schemas"]
    for path, name in (
        ("/v1/images/generations", "ImageRequest"),
        ("/v1/images/jobs", "ImageJobRequest"),
        ("/v1/chat/completions", "ChatRequest"),
    ):
        body = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == f"#/components/schemas/{name}"
        assert "prompt" in schemas[name]["properties"] or "messages" in schemas[name]["properties"]
    image = schemas["ImageRequest"]["properties"]
    assert image["size"]["enum"] == ["auto", "64x64", None]
    assert image["n"]["anyOf"][0]["maximum"] == 4  # the folder's batch
    assert image["preset"]["anyOf"][0]["enum"] == ["fast"]
    assert image["model"]["enum"] == ["blip3o-tiny-fp32", None]


def test_every_status_and_content_type_is_documented(openapi):
    paths = openapi["paths"]

    def codes(path, method):
        return set(paths[path][method]["responses"])

    assert {"200", "400", "404", "413", "422", "429", "500", "503"} <= codes(
        "/v1/images/generations", "post"
    )
    assert {"202", "400", "409", "429", "503"} <= codes("/v1/images/jobs", "post")
    assert {"200", "404", "409"} <= codes("/v1/images/jobs/{job_id}/content", "get")
    assert {"200", "400", "404", "429", "503"} <= codes("/v1/chat/completions", "post")
    for path in ("/v1/images/generations", "/v1/chat/completions"):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content), content
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for code in ("429", "503"):
        headers = paths["/v1/images/generations"]["post"]["responses"][code]["headers"]
        assert "Retry-After" in headers
    data = openapi["components"]["schemas"]["ImageData"]
    assert (
        set(data["required"]) == {"b64_json", "seed"}
        and "n > 1" in data["properties"]["seed"]["description"]
    )
    for path in paths.values():  # FastAPI's 422 for parameters it validates: ours are 400s
        for operation in path.values():
            assert "HTTPValidationError" not in str(operation.get("responses", {}).get("422"))


# ---- fuzzing the live server from its schema -----------------------------------------------------
@pytest.mark.slow
def test_schemathesis_finds_nothing(tiny_engine_dir, tmp_path):
    """Every check of schemathesis (`--checks all`: no 5xx, statuses / content types / headers /
    bodies as documented, schema-invalid data refused, schema-valid data accepted, links, ...)
    over the coverage, fuzzing and stateful phases, bounded in time. Steps are capped
    (`max_steps`) so every generated request costs milliseconds."""
    config = ServerConfig(engines=tiny_engine_dir, threads=1, max_steps=2)
    state = State(config)
    with local_server(config, state=state) as url:
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(TOML), "run"]
        cmd += [f"{url}/openapi.json", "--checks", "all", "--seed", "1", "--workers", "1"]
        cmd += ["--max-examples", "25", "--max-time", "35", "--request-timeout", "60"]
        cmd += ["--phases", "examples,coverage,fuzzing,stateful", "--no-color"]
        cmd += ["--report", "junit", "--report-dir", str(tmp_path)]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
        res = subprocess.run(  # in tmp_path: schemathesis keeps its cache in the cwd
            cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
        )
        failures = [p.read_text()[-3000:] for p in tmp_path.glob("junit*.xml")]
        tail = "\n".join(res.stdout.splitlines()[-40:]) + "\n".join(failures)
        assert res.returncode == 0, tail
        assert " passed" in res.stdout and "failure" not in res.stdout.split("SUMMARY")[-1], tail
        # the server is healthy after, nothing running or queued, no job left open
        assert httpx.get(f"{url}/v1/health/ready").status_code == 200
        deadline = time.monotonic() + 30
        while state.scheduler.running() or state.scheduler.queue_depth():
            assert time.monotonic() < deadline, "requests left running after the fuzz"
            time.sleep(0.1)
        assert len(state.gen._jobs) == 0
