"""A stage module that fails when imported: a target in it must be one clear error, not a crash."""

raise RuntimeError("raises_on_import fails at import on purpose")


def stage():  # pragma: no cover - never reached
    return 1
