"""SmallWebRTC in cluster mode: the offer reaches the right agent host through any gateway.

:mod:`tests.webrtc_cluster_driver` runs, inside a network namespace of its own (``unshare
-n``, root only), a private ``redis-server``, two gateways and two agent hosts with one
``examples/pipecat-webrtc-echo`` instance each. Two aiortc clients start their sessions on one
gateway and signal (offer, trickled candidates) through the other; each hears its 440 Hz tone
echoed, and both gateways show the records end as ``completed`` once the clients hang up.
"""

from __future__ import annotations

import shutil

import pytest

from tests.test_webrtc import _namespace_problem, in_namespace

pytestmark = pytest.mark.slow


def _cluster_problem() -> str | None:
    if (problem := _namespace_problem()) is not None:
        return problem
    if shutil.which("redis-server") is None:
        return "needs redis-server: the namespace cannot reach the machine's Redis"
    return None


@pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem()))
def test_offers_through_either_gateway_reach_the_agent_host_running_the_session() -> None:
    seen = in_namespace("tests.webrtc_cluster_driver", timeout=240)
    # One instance per host, one session per instance: the two sessions are on both hosts.
    instances = seen["instances"]
    assert None not in instances, instances
    assert len({iid.rsplit("-", 1)[0] for iid in instances}) == 2, instances
    for way in ("ab", "ba"):  # started on gateway A, signalled through B; and the reverse
        call = seen[way]
        session_id = call["start"]["body"]["sessionId"]
        assert call["start"] == {
            "status": 200,
            "body": {"sessionId": session_id, "iceConfig": {"iceServers": []}},
        }
        assert call["offer"] == {"status": 200, "keys": ["pc_id", "sdp", "type"]}
        assert call["patch"] == {"status": 200, "body": {"status": "success"}}
        assert call["end_of_candidates"] == 200
        assert abs(call["hz"] - 440.0) <= 5.0, call["hz"]
        assert call["rms"] > 1000, call["rms"]
        for live in call["live"]:  # as gateway A shows it, then B
            assert (live["status"], live["sessionId"]) == (200, session_id)
            assert (live["transport"], live["endedAt"], live["endState"]) == (
                "webrtc",
                None,
                "active",
            )
        for ended in call["ended"]:
            assert (ended["status"], ended["completionStatus"]) == (200, "completed")
            assert ended["transport"] == "webrtc"
        assert call["ended_after_hangup_s"] < 10
        assert call["offer_after_end"]["status"] == 404
        assert call["offer_after_end"]["body"]["code"] == "session_not_found"
    # An offer for a session no gateway started: `catflap serve`'s 404 (SessionProxy.place).
    unknown = seen["unknown"]
    assert unknown["status"] == 404
    assert unknown["body"] == {
        "error": f"no live session {unknown['id']} of agent echo.my-org: it never started or "
        "has ended; start a new one with POST /v1/public/{agent}/start",
        "code": "session_not_found",
    }
