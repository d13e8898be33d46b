"""Per-session resource samples (contract/resources.py): the points, their bound, the summary."""

from __future__ import annotations

from catflap.contract import limits
from catflap.contract.resources import ResourceSamples, summarize


def test_each_reading_after_the_first_is_one_point_of_millicores_and_bytes() -> None:
    samples = ResourceSamples(interval=1.0)
    samples.add(0.0, 10.0, 100)
    samples.add(1.0, 10.5, 200)  # half a core over the second
    samples.add(2.0, 12.0, 300)  # one and a half cores
    assert samples.points == [{"t": 1.0, "c": 500, "m": 200}, {"t": 2.0, "c": 1500, "m": 300}]


def test_a_last_reading_just_after_a_periodic_one_adds_no_point() -> None:
    samples = ResourceSamples(interval=1.0)
    samples.add(0.0, 0.0, 1)
    samples.add(1.0, 0.1, 1)
    samples.add(1.01, 0.2, 1)  # 10 ms of shutdown work would read as 10 cores
    assert samples.points == [{"t": 1.0, "c": 100, "m": 1}]


def test_the_points_never_exceed_the_bound_and_span_the_whole_session() -> None:
    samples = ResourceSamples()
    t = 0.0
    samples.add(t, 0.0, 0)
    for second in range(1, 14_401):  # a 4 h session, read at the interval it asks for
        t += samples.interval
        samples.add(t, t * 0.25, second)
        assert len(samples.points) < limits.RESOURCE_SAMPLES_MAX
    assert samples.points[-1]["t"] == round(t, 1)
    assert samples.points[0]["t"] < t / 50
    assert {point["c"] for point in samples.points} == {250}
    assert samples.interval > limits.RESOURCE_SAMPLE_INTERVAL_S


def test_the_summary_has_pccs_percentiles_and_is_none_without_points() -> None:
    assert summarize([]) is None
    points = [{"t": float(i), "c": i * 10, "m": i * 1000} for i in range(1, 101)]
    summary = summarize(points)  # type: ignore[arg-type]
    assert summary is not None
    assert (summary["cpuMillicoresP50"], summary["cpuMillicoresP90"]) == (500, 900)
    assert (summary["cpuMillicoresP95"], summary["cpuMillicoresP99"]) == (950, 990)
    assert (summary["memoryBytesP50"], summary["memoryBytesP99"]) == (50_000, 99_000)
    assert summary["sampleCount"] == 100 and summary["timeseries"] == points
