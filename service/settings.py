"""Service settings: defaults here, overridden by ``CAE_*`` environment variables, then by CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
# The default bundle ships with the project (and the Docker image), so `python -m service` needs no args.
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"

BackendName = Literal["auto", "onnxruntime", "openvino", "torch", "tensorrt"]
PrecisionName = Literal["auto", "fp32", "fp16", "int8", "bf16"]
DeviceName = Literal["auto", "cpu", "cuda"]


class Settings(BaseSettings):
    """Every knob of the server. Environment: ``CAE_<FIELD>`` (e.g. ``CAE_MAX_BATCH_SIZE=16``)."""

    model_config = SettingsConfigDict(env_prefix="CAE_", extra="ignore", protected_namespaces=())

    # model and runtime
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Bundle directory (spec.json + ONNX graphs).")
    backend: BackendName = Field("auto", description="auto = fastest available that meets min_cosine.")
    precision: PrecisionName = Field("auto", description="auto = fastest precision that meets min_cosine.")
    device: DeviceName = Field("auto", description="auto = CUDA when a GPU runtime is usable, else CPU.")
    min_cosine: float = Field(
        0.999,
        gt=0,
        le=1,
        description="Accuracy bound for automatic choices: min cosine of pooled embeddings to fp32.",
    )
    threads: int = Field(0, ge=0, description="Intra-op threads of the runtime (0 = the runtime's default).")
    task_backends: str | None = Field(
        None,
        description="Pin the runtime of each task, e.g. embed=openvino:bf16,detect=onnxruntime:fp32 "
        "(taken as "
        "given, no timing); workers > 1 pass their parent's selection to every process this way.",
    )
    cache_dir: Path | None = Field(None, description="Where GPU runtimes may cache built engines.")

    # batching and backpressure
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most images in one inference call.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="Longest a queued image waits for others to join its batch."
    )
    queue_size: int = Field(256, ge=1, description="Images waiting per task before new requests get 429.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a request (decode + queue + inference)."
    )
    max_concurrent_requests: int = Field(
        512,
        ge=1,
        description="Requests in flight (bodies held in memory) before new ones get 503 overloaded.",
    )
    shutdown_timeout_s: float = Field(30.0, ge=0, description="Time given to in-flight requests on shutdown.")
    unhealthy_retry_s: float = Field(
        5.0,
        gt=0,
        description="While unhealthy (repeated inference failures), let one request try the backend this "
        "often; a success makes the server ready again.",
    )

    # input limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_images_per_request: int = Field(64, ge=1, description="Most images in one /embed request.")
    max_pixels: int = Field(50_000_000, ge=1, description="Most pixels (w*h, from the header) per image.")
    min_side: int = Field(16, ge=1, description="Smallest accepted width or height in pixels.")
    decode_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1), ge=1, description="Threads decoding images."
    )

    # security
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma-separated in CAE_API_KEYS); empty = no auth.",
    )
    api_keys_file: Path | None = Field(None, description="File with one API key per line (mounted secrets).")

    # server
    host: str = Field("127.0.0.1", description="Bind address (the Docker image binds 0.0.0.0).")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Server processes sharing the port (SO_REUSEPORT), each with its own batchers and "
        "cpus/workers runtime and decode threads (docs/serving.md, Many cores).",
    )
    reuse_port: bool = Field(
        False, description="Bind with SO_REUSEPORT (set for the processes of workers > 1)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    demo: bool = Field(True, description="Serve the demo page at / (it calls the public routes only).")
    access_log: bool = Field(
        False,
        description="uvicorn's per-request log line (off by default, as gunicorn's access log: /metrics "
        "counts every request; turn it on to debug).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _read_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"api_keys_file {self.api_keys_file}: {e.strerror}") from None
            keys = [SecretStr(s.strip()) for s in lines if s.strip() and not s.lstrip().startswith("#")]
            self.api_keys = [*self.api_keys, *keys]
        return self

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log or show: keys are reduced to their count."""
        d = self.model_dump(mode="json", exclude={"api_keys", "api_keys_file"})
        d["api_keys"] = f"{len(self.api_keys)} configured" if self.api_keys else "none (auth off)"
        return d
