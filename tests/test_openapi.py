"""The control API's OpenAPI document describes what the API takes: every request body with its
schema (``/start`` reads its JSON by hand, within a bound, and still documents PCC's
``StartRequest``, every field typed), the public-key bearer scheme of ``/start`` (PCC's
``PublicKeyAuth``) and the private-key scheme of the management API. Served as ``catflap serve``
serves it, on httpx's ASGI transport over real parts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from catflap.api.app import START_TRANSPORTS, create_api
from catflap.api.deps import ApiDeps
from catflap.directory import AgentDirectory
from catflap.metrics import GatewayMetrics, MetricSources
from catflap.sessions.recent import RecentRecords
from catflap.sessions.sqlite import SqliteSessionStore

from .conftest import TEST_KEYRING, FakeClock
from .test_api_unit import FakePool, config

START = "/v1/public/{agent}/start"
#: PCC's StartRequest fields (pipecat-ai/docs openapi-start.json) and their JSON types.
PCC_START_FIELDS = {
    "createDailyRoom": "boolean",
    "dailyRoomProperties": "object",
    "dailyMeetingTokenProperties": "object",
    "enableDefaultIceServers": "boolean",
    "transport": "string",
    "body": None,  # any JSON value
}
#: Methods whose requests carry a body.
_WITH_BODY = {"post", "put", "patch"}


@pytest.fixture
async def document(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    cfg = config(tmp_path)
    store = SqliteSessionStore(tmp_path / "sessions.sqlite3")
    deps = ApiDeps(
        config=cfg,
        agents=AgentDirectory(cfg),
        keyring=TEST_KEYRING,
        clock=FakeClock(),
        pool=FakePool(),
        sessions=RecentRecords(),
        store=store,
        metrics=GatewayMetrics(MetricSources(agent_keys=lambda: [], pool_states=lambda: None)),
        draining=lambda: False,
        relays={},
    )
    transport = httpx.ASGITransport(app=create_api(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        response = await client.get("/openapi.json")
    await store.close()
    assert response.status_code == 200
    served: dict[str, Any] = response.json()
    yield served


def _types(schema: dict[str, Any]) -> set[str]:
    return {branch["type"] for branch in schema.get("anyOf", [schema]) if "type" in branch}


def test_every_operation_that_takes_a_body_documents_its_schema(document: dict[str, Any]) -> None:
    """A POST, PUT or PATCH documents its body: at least one media type, each with a schema,
    and a schema that names a model names one the document defines. (A route that passes bodies
    through, such as the session proxy, documents them as any bytes of any type.)"""
    schemas = document["components"]["schemas"]
    operations = [
        (method, path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]
    assert ("post", START) in {(m, p) for m, p, _ in operations}
    for method, path, operation in operations:
        if method not in _WITH_BODY:
            continue
        assert "requestBody" in operation, f"{method.upper()} {path} does not document its body"
        content = operation["requestBody"]["content"]
        assert content, (method, path)
        for media_type, described in content.items():
            assert "schema" in described, (method, path, media_type)
            ref = described["schema"].get("$ref")
            if ref is not None:
                assert ref.rpartition("/")[2] in schemas, (method, path, ref)


def test_start_documents_every_pcc_field_typed(document: dict[str, Any]) -> None:
    body = document["paths"][START]["post"]["requestBody"]
    assert body == {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StartRequest"}}},
    }
    fields = document["components"]["schemas"]["StartRequest"]["properties"]
    assert set(fields) == set(PCC_START_FIELDS)
    for name, json_type in PCC_START_FIELDS.items():
        assert fields[name]["description"], name
        if json_type is not None:
            assert json_type in _types(fields[name]), name
    assert fields["createDailyRoom"]["default"] is False
    assert fields["enableDefaultIceServers"]["default"] is False
    (strings,) = [b for b in fields["transport"]["anyOf"] if b.get("type") == "string"]
    assert strings["enum"] == list(START_TRANSPORTS)
    assert {"daily", "websocket"} <= set(strings["enum"])


def test_start_documents_every_pcc_response_field(document: dict[str, Any]) -> None:
    ok = document["paths"][START]["post"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"] == {"$ref": "#/components/schemas/StartResponse"}
    fields = document["components"]["schemas"]["StartResponse"]["properties"]
    assert {"sessionId", "dailyRoom", "dailyToken", "wsUrl", "token", "body"} <= set(fields)
    assert document["components"]["schemas"]["StartResponse"]["required"] == ["sessionId"]
    for status in ("400", "401", "429", "502", "503", "504"):
        error = document["paths"][START]["post"]["responses"][status]["content"]
        assert error["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


def test_the_public_and_private_key_schemes_are_bearer_and_each_route_names_its_own(
    document: dict[str, Any],
) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["public key"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A public API key of the organization: `Authorization: Bearer pk_...`",
    }
    assert schemes["private key"]["type"] == "http"
    assert schemes["private key"]["scheme"] == "bearer"
    assert document["paths"][START]["post"]["security"] == [{"public key": []}]
    management = [
        operation
        for path, methods in document["paths"].items()
        if path.startswith("/v1/agents/")
        for operation in methods.values()
    ]
    assert management
    assert all(operation["security"] == [{"private key": []}] for operation in management)
