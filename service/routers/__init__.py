"""One router per route group.

Extension point for new task heads (``/segment``, ``/detect`` from the heads issue): add a module here
with a ``router`` whose handler does ``runtime.batcher("<task>")`` (404 ``task_not_available`` when the
bundle has no such graph), decodes with ``common.preprocess_all``, submits to the batcher (``key`` groups
requests whose inputs must share a shape), and post-processes; then list it in ``ROUTERS``. The
backends already run any task the bundle's ``spec["tasks"]`` lists, by name, and the runtime makes a
batcher for each, so no other layer changes.
"""

from fastapi import APIRouter

from . import embed, health, models, reconstruct

ROUTERS: list[APIRouter] = [health.router, models.router, embed.router, reconstruct.router]

__all__ = ["ROUTERS"]
