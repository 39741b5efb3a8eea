"""Placeholder replaced by the evaluation module (written next)."""

class EvalError(ValueError):
    pass
