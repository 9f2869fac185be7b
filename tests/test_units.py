"""units: sizes and counts read from config, durations written for people."""

from __future__ import annotations

import pytest

from flowdapt_nb.units import fmt_duration, parse_bytes


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "–"),
        (float("nan"), "–"),
        (0.0, "<1 ms"),  # a tiny task did take time: never "0 ms"
        (0.0003, "<1 ms"),
        (0.0006, "1 ms"),
        (-0.003, "-3 ms"),  # clock skew between machines shows, not hidden as "<1 ms"
        (0.25, "250 ms"),
        (3.44, "3.4 s"),
        (125, "2 m 05 s"),
        (3725, "1 h 02 m"),
    ],
)
def test_fmt_duration(seconds, text):
    assert fmt_duration(seconds) == text


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("1GiB") == 2**30 and parse_bytes(400) == 400
