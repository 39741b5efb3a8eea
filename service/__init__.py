"""The HTTP service: ``python -m service`` serves a model bundle (see docs/serving.md).

Nothing here imports torch: the torch backend imports it only when it is chosen.
"""
