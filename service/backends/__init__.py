"""Inference runtimes behind one interface (:class:`Backend`); :func:`select_backend` picks and loads one."""

from .base import Backend, BackendOptions, BackendUnavailable
from .select import BACKENDS, Selection, select_backend

__all__ = ["BACKENDS", "Backend", "BackendOptions", "BackendUnavailable", "Selection", "select_backend"]
