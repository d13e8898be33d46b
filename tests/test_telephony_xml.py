"""`catflap telephony-xml`: markup each provider accepts, pointing at the right URL."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

from click.testing import CliRunner

from catflap.cli import cli


def _xml(*args: str) -> str:
    result = CliRunner().invoke(cli, ["telephony-xml", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_twiml_names_the_agent_in_a_parameter() -> None:
    root = ET.fromstring(_xml("twilio", "my-agent.my-org", "--url", "wss://v.example.com"))
    stream = root.find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://v.example.com/ws/twilio"
    parameter = stream.find("Parameter")
    assert parameter is not None
    assert (parameter.get("name"), parameter.get("value")) == (
        "_pipecatCloudServiceHost",
        "my-agent.my-org",
    )


def test_texml_streams_bidirectional_rtp_with_service_host_and_body() -> None:
    root = ET.fromstring(
        _xml("telnyx", "my-agent.my-org", "--url", "wss://v.example.com", "--body", '{"a": 1}')
    )
    stream = root.find("./Connect/Stream")
    assert stream is not None and stream.get("bidirectionalMode") == "rtp"
    url = urlsplit(stream.get("url") or "")
    assert url.path == "/ws/telnyx"
    assert parse_qs(url.query) == {"serviceHost": ["my-agent.my-org"], "body": ["eyJhIjogMX0="]}


def test_plivo_xml_has_the_stream_attributes_pipecat_needs() -> None:
    root = ET.fromstring(
        _xml("plivo", "my-agent.my-org", "--url", "wss://v.example.com", "--token", "abc.def")
    )
    stream = root.find("Stream")
    assert stream is not None
    assert stream.attrib == {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000",
    }
    assert stream.text == "wss://v.example.com/ws/plivo/abc.def?serviceHost=my-agent.my-org"


def test_exotel_prints_the_url_for_the_voicebot_applet() -> None:
    out = _xml("exotel", "my-agent.my-org", "--url", "wss://v.example.com")
    assert "wss://v.example.com/ws/exotel?serviceHost=my-agent.my-org" in out


def test_bad_service_host_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["telephony-xml", "twilio", "nodot", "--url", "wss://x"])
    assert result.exit_code == 2
    assert "AGENT.ORG" in result.output
