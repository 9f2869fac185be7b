"""Stage functions for tests/test_dashboards_live.py that workers import by name."""

import time


def mostly_tiny(x, long_item=300, delay=1.5):
    """Instant, except one item that works for ``delay`` seconds (it runs inside a chunk)."""
    if x == long_item:
        time.sleep(delay)
    return x
