"""POST /reconstruct: mask patches of one image and show what the model predicts for them.

Pixel-target bundles only (a DALL-E-target model predicts token ids, not pixels). The de-normalization
is described in ``service/postprocess.py`` and docs/serving.md.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from .. import postprocess as P
from ..bundle import Bundle
from ..deps import DeadlineDep, RuntimeDep, require_api_key
from ..errors import Unprocessable
from ..fast import JSONResponse
from ..schemas import ReconstructResponse, View
from .common import ERROR_RESPONSES, images_request_body, negotiate, off_loop, read_decode_submit

router = APIRouter(tags=["reconstruct"], dependencies=[Depends(require_api_key)])


def parse_mask(
    bundle: Bundle, masked: str | None, mask_ratio: float | None, seed: int | None
) -> tuple[np.ndarray, int | None]:
    """Sorted masked indices and the seed used (None for an explicit mask)."""
    n = bundle.image.num_patches
    if masked is not None:
        if mask_ratio is not None or seed is not None:
            raise Unprocessable("give either masked or mask_ratio/seed, not both", code="invalid_mask")
        idx = [int(s) for s in masked.split(",")]
        bad = [i for i in idx if i >= n]
        if bad:
            raise Unprocessable(
                f"masked index {bad[0]} out of range: the model has {n} patches (0..{n - 1})",
                code="invalid_mask",
                limit=n - 1,
            )
        if len(set(idx)) != len(idx):
            raise Unprocessable("masked indices repeat", code="invalid_mask")
        if len(idx) > n - 1:
            raise Unprocessable(
                f"at least one patch must stay visible: at most {n - 1} masked",
                code="invalid_mask",
                limit=n - 1,
            )
        return np.asarray(sorted(idx), dtype=np.int64), None
    seed = secrets.randbits(31) if seed is None else seed
    ratio = bundle.default_mask_ratio if mask_ratio is None else mask_ratio
    return P.random_mask(n, ratio, seed), seed


def build_outputs(bundle: Bundle, x: np.ndarray, idx: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    spec = bundle.image
    rec = P.reconstruct(x, idx, pred, spec, bundle.norm_pix_loss)
    err = P.per_patch_mse(x, rec, idx, spec)
    return {
        "original": P.to_uint8(x, spec),
        "masked": P.to_uint8(P.masked_view(x, idx, spec), spec),
        "reconstruction": P.to_uint8(rec, spec),
        "error": err,
    }


@router.post(
    "/reconstruct",
    response_model=ReconstructResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "PNG (default): original | masked | reconstruction, or "
            "the reconstruction alone with view=reconstruction. JSON with "
            "Accept: application/json.",
        },
    },
    openapi_extra=images_request_body(single=True),
    summary="Reconstruct masked patches of one image (pixel-target models)",
)
async def reconstruct(
    request: Request,
    runtime: RuntimeDep,
    deadline: DeadlineDep,
    mask_ratio: Annotated[
        float | None,
        Query(gt=0, lt=1, description="Fraction of patches masked at random (default: the model's)."),
    ] = None,
    seed: Annotated[
        int | None,
        Query(ge=0, lt=2**63, description="Seed of the random mask (default: random, returned in X-Seed)."),
    ] = None,
    masked: Annotated[
        str | None,
        Query(
            pattern=r"^\d{1,6}(,\d{1,6})*$",
            max_length=20000,
            description="Explicit masked patch indices, comma-separated, "
            "row-major (instead of mask_ratio/seed).",
        ),
    ] = None,
    view: Annotated[
        View, Query(description="PNG content: the 3-panel strip or the reconstruction.")
    ] = View.panel,
    accept: Annotated[str | None, Header(description="image/png (default) or application/json.")] = None,
) -> Response:
    as_json = negotiate(accept, ("image/png", "application/json")) == "application/json"  # 406 first
    runtime.require_ready()
    bundle = runtime.bundle
    assert bundle is not None
    if bundle.target_type != "pixel":
        raise Unprocessable(
            f"reconstruction needs a pixel-target model; this bundle ({bundle.model_id}) predicts "
            f"{bundle.target_type} tokens, not pixels",
            code="needs_pixel_target",
        )
    batcher = runtime.batcher("reconstruct")
    idx, used_seed = parse_mask(bundle, masked, mask_ratio, seed)
    mask = np.zeros((1, bundle.image.num_patches), dtype=bool)
    mask[0, idx] = True
    # the graph needs one masked count per batch: requests batch only with the same count
    sub = await read_decode_submit(
        request, runtime, batcher, deadline, max_images=1, extra_inputs={"mask": mask}, key=len(idx)
    )
    x, pred = sub.images, sub.output
    outs = await off_loop(runtime, build_outputs, bundle, x[0], idx, pred[0])
    ratio = len(idx) / bundle.image.num_patches
    headers = {"X-Model-Id": bundle.model_id, "X-Masked-Count": str(len(idx)), "X-Mask-Ratio": f"{ratio:.6g}"}
    if used_seed is not None:
        headers["X-Seed"] = str(used_seed)
    if as_json:

        def encode() -> dict[str, str]:
            return {k: P.b64png(outs[k]) for k in ("original", "masked", "reconstruction")}

        images = await off_loop(runtime, encode)
        grid = np.zeros(bundle.image.num_patches, dtype=bool)
        grid[idx] = True
        err = outs["error"]
        body = {
            "model": bundle.model_id,
            "grid": list(bundle.image.grid),
            "patch_size": bundle.image.patch_size,
            "mask_ratio": ratio,
            "seed": used_seed,
            "masked_indices": idx.tolist(),
            "mask": grid.reshape(bundle.image.grid).tolist(),
            "per_patch_error": err.astype(float).tolist(),
            "mean_error": float(err.mean()),
            "images": images,
        }
        return JSONResponse(body, headers=headers)
    if view is View.reconstruction:
        arr = outs["reconstruction"]
    else:
        arr = np.concatenate([outs["original"], outs["masked"], outs["reconstruction"]], axis=1)
    data = await off_loop(runtime, P.png, arr)
    return Response(data, media_type="image/png", headers=headers)
