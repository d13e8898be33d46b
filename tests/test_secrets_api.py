"""The secret sets API (``/v1/organizations/{org}/secrets...``, PCC's shapes) on a real gateway:
what each route answers, byte for byte; the private key and the path's organization; every bound
and bad input with its code; a set put through the API reaching the next instance; and a value
in no answer, log line or file in clear."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from catflap.config import CatflapConfig
from catflap.contract import limits
from catflap.runtime.botlogs import session_log_path
from catflap.secretsets.cipher import SECRETS_KEY_ENV, generate_key
from tests.conftest import BOTS, PRIVATE_KEY, PUBLIC_KEY, RunningGateway, running_gateway, seconds

pytestmark = pytest.mark.slow

BASE = "/v1/organizations/my-org/secrets"
AUTH = {"authorization": f"Bearer {PRIVATE_KEY}"}
#: Distinctive, so that a search finds it wherever it leaked.
VALUE = "api-sekrit-5d0c7a91e3b24f6a8c"
OTHER = "api-sekrit-other-1b2c3d4e5f6a7b"


def _in(state_dir: Path) -> Callable[[CatflapConfig], CatflapConfig]:
    def adjust(config: CatflapConfig) -> CatflapConfig:
        return config.model_copy(update={"state_dir": state_dir})

    return adjust


@pytest.fixture
async def gw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningGateway]:
    monkeypatch.setenv(SECRETS_KEY_ENV, generate_key())
    # min_agents 0: the first instance starts at the first /start, after the set is put.
    agents = {"envbot": {"path": BOTS / "env_report", "secret_set": "bot-keys"}}
    async with running_gateway(agents, adjust=_in(tmp_path / "state")) as running:
        yield running


@pytest.fixture
async def client(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30), headers=AUTH) as c:
        yield c


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"} and body["code"] == code, body
    message: str = body["error"]
    return message


async def test_put_list_get_and_delete_answer_pccs_shapes(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []

    async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await client.request(method, BASE + path, **kwargs)
        answers.append(response.text)
        return response

    empty = await call("GET", "")
    assert (empty.status_code, empty.json()) == (200, {"sets": []})
    # The CLI's shape: one secret per request, with the set's name and region.
    cli_body = {
        "name": "bot-keys",
        "isImagePullSecret": False,
        "secretKey": "MY_SECRET",
        "secretValue": VALUE,
    }
    created = await call("PUT", "/bot-keys", json=cli_body | {"region": "us-west"})
    assert (created.status_code, created.json()) == (200, {"status": "OK", "region": "self-hosted"})
    # PCC's REST reference's shape: several at once.
    rest_body = {
        "secrets": [
            {"secretKey": "OTHER_SECRET", "secretValue": OTHER},
            {"secretKey": "EMPTY", "secretValue": ""},
        ]
    }
    updated = await call("PUT", "/bot-keys", json=rest_body)
    assert (updated.status_code, updated.json()) == (200, {"status": "OK", "region": "self-hosted"})
    assert (await call("PUT", "/more", json={"secretKey": "A", "secretValue": "1"})).is_success

    listed = await call("GET", "")
    assert (listed.status_code, listed.json()) == (
        200,
        {
            "sets": [
                {"name": "bot-keys", "type": "secret", "region": "self-hosted", "status": "ready"},
                {"name": "more", "type": "secret", "region": "self-hosted", "status": "ready"},
            ]
        },
    )
    one = await call("GET", "/bot-keys", params={"region": "us-west"})
    assert (one.status_code, one.json()) == (
        200,
        {
            "name": "bot-keys",
            "region": "self-hosted",
            "status": "ready",
            "secrets": [
                {"fieldName": "EMPTY"},
                {"fieldName": "MY_SECRET"},
                {"fieldName": "OTHER_SECRET"},
            ],
        },
    )

    gone = await call("DELETE", "/bot-keys/EMPTY")
    assert (gone.status_code, gone.json()) == (200, {"status": "OK"})
    assert [s["fieldName"] for s in (await call("GET", "/bot-keys")).json()["secrets"]] == [
        "MY_SECRET",
        "OTHER_SECRET",
    ]
    again = await call("DELETE", "/bot-keys/EMPTY")
    assert _error(again, 404, "secret_not_found") == "secret set 'bot-keys' has no secret 'EMPTY'"
    deleted = await call("DELETE", "/more")
    assert (deleted.status_code, deleted.json()) == (200, {"status": "OK"})
    for method, path in (("GET", "/more"), ("DELETE", "/more"), ("DELETE", "/more/A")):
        message = _error(await call(method, path), 404, "secret_set_not_found")
        assert message.startswith("organization 'my-org' has no secret set 'more'"), message
    assert [s["name"] for s in (await call("GET", "")).json()["sets"]] == ["bot-keys"]

    log_text = "\n".join(record.getMessage() for record in caplog.records)
    assert "secret set 'bot-keys' of organization 'my-org' created through the API" in log_text
    for value in (VALUE, OTHER):
        assert not [a for a in answers if value in a]
        assert value not in log_text


async def test_the_private_key_of_the_paths_organization_is_needed(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as anonymous:
        for headers in ({}, {"authorization": f"Bearer {PUBLIC_KEY}"}, {"authorization": "x"}):
            for method, path in (("GET", ""), ("GET", "/k"), ("PUT", "/k"), ("DELETE", "/k/A")):
                response = await anonymous.request(
                    method,
                    BASE + path,
                    headers=headers,
                    json={"secretKey": "A", "secretValue": "v"},
                )
                _error(response, 401, "401")
        other = await anonymous.get("/v1/organizations/other-org/secrets", headers=AUTH)
        assert "set PIPECAT_ORG=my-org" in _error(other, 404, "404")


async def test_bad_names_values_and_bodies_are_refused_with_their_codes(
    client: httpx.AsyncClient,
) -> None:
    async def put(body: Any, path: str = "/keys", **kwargs: Any) -> httpx.Response:
        if "content" in kwargs:
            return await client.put(BASE + path, **kwargs)
        return await client.put(BASE + path, json=body, **kwargs)

    def pair(key: str = "A", value: str = "v") -> dict[str, str]:
        return {"secretKey": key, "secretValue": value}

    messages = []
    bad_set = await put(pair(), "/bad.name")
    messages.append(_error(bad_set, 400, "invalid_secret_name"))
    assert messages[-1].startswith("secret set name 'bad.name' contains characters other than")
    too_long = "k" * (limits.SECRET_NAME_MAX_LEN + 1)
    messages.append(_error(await client.get(f"{BASE}/{too_long}"), 400, "invalid_secret_name"))
    messages.append(_error(await put(pair("MY KEY")), 400, "invalid_secret_name"))
    messages.append(_error(await client.delete(f"{BASE}/keys/a.b"), 400, "invalid_secret_name"))
    messages.append(_error(await put(pair(value=f"{VALUE}\0")), 400, "invalid_secret_value"))
    big = "x" * (limits.SECRET_VALUE_MAX_BYTES + 1)
    messages.append(_error(await put(pair(value=big)), 400, "secret_too_large"))
    assert messages[-1] == (
        f"the value of secret 'A' is {limits.SECRET_VALUE_MAX_BYTES + 1} bytes long; at most "
        f"{limits.SECRET_VALUE_MAX_BYTES} bytes are allowed (keep large files, e.g. "
        "certificates, outside the set and put their path in it)"
    )
    # A whole set over its bound, in one request of several secrets that each fit.
    half = "y" * (limits.SECRET_VALUE_MAX_BYTES - 8)
    several = {"secrets": [pair(f"K{i}", half) for i in range(3)]}
    messages.append(_error(await put(several), 400, "secret_too_large"))
    over = b'{"secretKey": "A", "secretValue": "' + b"z" * limits.SECRETS_REQUEST_MAX_BYTES + b'"}'
    headers = {"content-type": "application/json"}
    messages.append(
        _error(await put(None, content=over, headers=headers), 413, "request_too_large")
    )
    many = {"secrets": [pair(f"K{i}") for i in range(limits.SECRETS_PER_REQUEST_MAX + 1)]}
    messages.append(_error(await put(many), 413, "request_too_large"))
    assert messages[-1] == (
        f"the request puts {limits.SECRETS_PER_REQUEST_MAX + 1} secrets; at most "
        f"{limits.SECRETS_PER_REQUEST_MAX} per request: split them over several requests"
    )
    at_most = {"secrets": [pair(f"K{i}") for i in range(limits.SECRETS_PER_REQUEST_MAX)]}
    assert (await put(at_most, "/many")).status_code == 200
    form = {"content-type": "application/x-www-form-urlencoded"}
    not_json = await put(None, content=b"A=v", headers=form)
    messages.append(_error(not_json, 415, "unsupported_media_type"))
    broken = await put(None, content=b"{", headers=headers)
    messages.append(_error(broken, 400, "bad_request"))
    for body in (
        {"secretKey": "A"},
        {"secretKey": "A", "secretValue": 5},
        pair() | {"secrets": [pair()]},
        {"secrets": []},
        {"secrets": [{"secretKey": "A", "secretValue": VALUE, "x": {"y": VALUE}}, VALUE]},
        [VALUE],
        pair() | {"name": "another-set"},
    ):
        messages.append(_error(await put(body), 400, "bad_request"))
    image = {"isImagePullSecret": True, "secretValue": VALUE, "host": "https://index.docker.io"}
    messages.append(_error(await put(image), 501, "not_supported_self_hosted"))
    reference = await client.post(f"{BASE}/references", json={"name": "k8s", "region": "eu"})
    messages.append(_error(reference, 501, "not_supported_self_hosted"))
    assert messages[-1].startswith(
        "catflap is self-hosted and does not do referenced Kubernetes Secrets"
    )
    # Nothing was stored by a refusal; no refusal quotes a value; none has a "[...]" that the
    # CLI's rich output would swallow.
    assert [s["name"] for s in (await client.get(BASE)).json()["sets"]] == ["many"]
    assert not [m for m in messages if VALUE in m or "[" in m]


async def test_a_set_put_through_the_api_reaches_the_next_instance(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as client:
        put = await client.put(
            f"{BASE}/bot-keys", json={"secretKey": "MY_SECRET", "secretValue": VALUE}, headers=AUTH
        )
        assert put.status_code == 200, put.text
        started = await client.post(
            "/v1/public/envbot/start",
            json={"body": {"names": ["MY_SECRET"], "digest": True}},
            headers={"authorization": f"Bearer {PUBLIC_KEY}"},
        )
        assert started.status_code == 200, started.text
    session_id = started.json()["sessionId"]
    async with asyncio.timeout(seconds(20)):
        while session_id not in gw.gateway.sessions.ended:
            await asyncio.sleep(0.01)
    path = session_log_path(gw.config.log_dir, "my-org", "envbot", session_id)
    printed = [json.loads(line)["line"] for line in path.read_text().splitlines()]
    digest = hashlib.sha256(VALUE.encode()).hexdigest()
    assert f"MY_SECRET sha256={digest}" in printed
    state = gw.config.state_dir
    assert not [p for p in state.rglob("*") if p.is_file() and VALUE.encode() in p.read_bytes()]
