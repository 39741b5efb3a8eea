"""One router per route group.

Extension point for new task heads: add a module here with a ``router`` whose handler does
``runtime.batcher("<task>")`` (404 ``task_not_available`` when the bundle has no such graph, 501
``task_unsupported_by_backend`` when the backend cannot run it), decodes with ``common.decode_all`` /
``preprocess_all`` (the task's own ``image`` spec), submits to the batcher (``key`` groups requests whose
inputs must share a shape), and post-processes; then list it in ``ROUTERS``. The backends run any task
the bundle's ``spec["tasks"]`` lists, by name, and the runtime makes a batcher for each (one image per
call for graphs fixed to batch 1; a dict of outputs per image for multi-output graphs).
"""

from fastapi import APIRouter

from . import demo, detect, docs, embed, health, models, reconstruct, segment

ROUTERS: list[APIRouter] = [
    health.router,
    models.router,
    embed.router,
    reconstruct.router,
    segment.router,
    detect.router,
    docs.router,
    demo.router,
]

__all__ = ["ROUTERS"]
