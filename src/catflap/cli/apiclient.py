"""Calling a gateway's private-key API from the CLI: ``--url``, ``--key`` and error handling.

Shared by ``catflap sessions`` and ``catflap logs``. An error from the API prints its message and
exits 1 (:data:`~catflap.cli.exits.EXIT_API`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from catflap.cli.exits import EXIT_API

__all__ = ["DEFAULT_URL", "ApiError", "api_options", "call_api"]

#: Where ``catflap serve`` listens unless told otherwise.
DEFAULT_URL = "http://127.0.0.1:8080"
#: Per request; the API answers from memory or one indexed query.
_TIMEOUT_S = 10.0

_F = TypeVar("_F", bound=Callable[..., Any])


class ApiError(click.ClickException):
    """The gateway refused the call or could not be reached; exits with :data:`EXIT_API`."""

    exit_code = EXIT_API

    def show(self, file: Any = None) -> None:
        click.echo(f"catflap: {self.format_message()}", err=True)


def api_options(command: _F) -> _F:
    """``--url``, ``--key`` and ``--json``, shared by every command that calls the API."""
    command = click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON answer as it came."
    )(command)
    command = click.option(
        "--key",
        envvar="CATFLAP_PRIVATE_KEY",
        required=True,
        show_envvar=True,
        help="Private API key (sk_...) of the agent's organization.",
    )(command)
    command = click.option(
        "--url",
        envvar="CATFLAP_URL",
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        help="The gateway's HTTP address.",
    )(command)
    return command


def call_api(
    url: str, key: str, method: str, path: str, params: dict[str, Any] | None = None
) -> Any:
    """One API call; its JSON answer.

    Raises:
        ApiError: the gateway is unreachable, or answered with an error (its message shown).
    """
    import httpx  # here, not at the top: `catflap serve` and `catflap agent` never need it

    try:
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as client:
            response = client.request(
                method, path, params=params, headers={"Authorization": f"Bearer {key}"}
            )
    except httpx.HTTPError as exc:
        raise ApiError(f"could not reach the gateway at {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and body is not None:
        return body
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        raise ApiError(f"{body['error']} (HTTP {response.status_code}, code {body.get('code')})")
    text = response.text.strip()[:200] or response.reason_phrase
    raise ApiError(f"unexpected answer from {url}: HTTP {response.status_code}: {text}")
