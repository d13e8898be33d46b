"""Provider stream URLs and ready-to-paste provider XML for an agent.

Used by ``POST /v1/public/{agent}/start`` with a telephony ``transport`` and by
``catflap telephony-xml``. What each provider needs (spec/pipecat-cloud-contract.md §4.2):

=========  ==========================================  ========================================
provider   where the agent is named                    markup
=========  ==========================================  ========================================
twilio     ``<Parameter name="_pipecatCloudServiceHost">``  TwiML ``<Connect><Stream url>``; Twilio
           (Twilio strips query strings)                strips query strings, so no ``?body=``
telnyx     ``?serviceHost=`` (and ``&body=``)          TeXML ``<Stream bidirectionalMode="rtp">``
plivo      ``?serviceHost=`` (and ``&body=``)          Plivo XML ``<Stream bidirectional="true"
                                                       keepCallAlive="true" contentType=
                                                       "audio/x-mulaw;rate=8000">``
exotel     ``?serviceHost=``                           none: paste the URL into the Voicebot
                                                       applet (Exotel may strip query strings)
=========  ==========================================  ========================================

A token, when the agent needs one, is always a trailing path segment: ``/ws/<provider>/<token>``.
"""

from __future__ import annotations

from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from catflap.contract import headers as hdrs
from catflap.gateway.providers import PROVIDERS, SERVICE_HOST_PARAMETER

__all__ = ["TELEPHONY_TRANSPORTS", "provider_ws_url", "provider_xml"]

TELEPHONY_TRANSPORTS = tuple(PROVIDERS)


def provider_ws_url(
    base: str,
    provider: str,
    service_host: str,
    *,
    token: str | None = None,
    body_b64: str | None = None,
) -> str:
    """The stream URL to give the provider.

    Args:
        base: the deployment's public WebSocket base, e.g. ``wss://voice.example.com``.
        body_b64: standard base64 JSON for ``?body=`` (ignored for Twilio, which strips
            query strings; use ``<Parameter>`` elements there).
    """
    url = f"{base.rstrip('/')}/ws/{provider}"
    if token:
        url += f"/{token}"
    if provider == "twilio":
        return url
    url += f"?{hdrs.QUERY_SERVICE_HOST}={quote(service_host, safe='.')}"
    if body_b64:
        url += f"&{hdrs.QUERY_BODY}={quote(body_b64, safe='')}"
    return url


def provider_xml(provider: str, url: str, service_host: str) -> str:
    """Markup that connects a call to ``url``; for Exotel, instructions instead."""
    if provider == "twilio":
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n  <Connect>\n'
            f"    <Stream url={quoteattr(url)}>\n"
            f"      <Parameter name={quoteattr(SERVICE_HOST_PARAMETER)} "
            f"value={quoteattr(service_host)}/>\n"
            "    </Stream>\n  </Connect>\n</Response>\n"
        )
    if provider == "telnyx":
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n  <Connect>\n'
            f'    <Stream url={quoteattr(url)} bidirectionalMode="rtp"></Stream>\n'
            '  </Connect>\n  <Pause length="40"/>\n</Response>\n'
        )
    if provider == "plivo":
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n'
            '  <Stream bidirectional="true" keepCallAlive="true" '
            f'contentType="audio/x-mulaw;rate=8000">{escape(url)}</Stream>\n</Response>\n'
        )
    if provider == "exotel":
        return (
            "Exotel has no XML: in App Bazaar, add a Voicebot applet to the call flow and set\n"
            f"its URL to:\n\n  {url}\n"
        )
    raise ValueError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
