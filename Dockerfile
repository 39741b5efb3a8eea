# syntax=docker/dockerfile:1
# cae-service: the FastAPI server on an exported model bundle. No torch in the image.
#   CPU (default):  docker build -t cae-service . && docker run -p 8000:8000 cae-service
#   GPU:            docker build --target gpu -t cae-service:gpu . && docker run --gpus all -p 8000:8000 cae-service:gpu
# Another bundle:   docker run -v /path/to/bundle:/models/custom:ro -e CAE_MODEL_DIR=/models/custom -p 8000:8000 cae-service
# The image ships the bundle's ONNX graphs, weights.bin and spec.json only: the training sources
# (*.safetensors, for the torch backend, which this image cannot run) stay out unless
# --build-arg WITH_TORCH_SOURCES=1 asks for them (for an image that adds torch on top of this one).

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ------------------------------------------------------------------------------------------- bundle
# pruned in its own stage: a file removed in a later layer would still weigh in the final image
FROM ${PYTHON_IMAGE} AS bundle
ARG WITH_TORCH_SOURCES=0
COPY models/default /bundle
RUN if [ "$WITH_TORCH_SOURCES" != 1 ]; then rm -f /bundle/*.safetensors; fi

# ---------------------------------------------------------------------------------------------- cpu
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cae
WORKDIR /app
# dependencies first (cached layer): the `serve` extra only, never torch
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies'] + d['project']['optional-dependencies']['serve']))" > /tmp/req.txt \
 && pip install -r /tmp/req.txt && rm /tmp/req.txt \
 && OV=$(python -c "import openvino, os; print(os.path.dirname(openvino.__file__))") \
 && rm -rf "$OV/include" "$OV"/libs/libopenvino_intel_gpu_plugin.so "$OV"/libs/libopenvino_intel_npu_plugin.so \
      "$OV"/libs/libopenvino_tensorflow_frontend.so.* "$OV"/libs/libopenvino_tensorflow_lite_frontend.so.* \
      "$OV"/libs/libopenvino_pytorch_frontend.so.* "$OV"/libs/libopenvino_paddle_frontend.so.* \
      "$OV"/libs/libopenvino_gguf_frontend.so.* "$OV"/libs/libopenvino_jax_frontend.so.* \
 && python -c "import openvino as ov; assert 'CPU' in ov.Core().available_devices"
# ^ OpenVINO on CPU only: its GPU/NPU plugins and non-ONNX frontends are ~70 MB this image never uses
COPY service ./service
COPY --from=bundle /bundle ./models/default
RUN python -c "import service" && ! python -c "import torch" 2>/dev/null
ENV CAE_MODEL_DIR=/app/models/default CAE_HOST=0.0.0.0 CAE_PORT=8000 PYTHONPATH=/app
USER cae
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------------- gpu
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \
 && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cae
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
deps = d['project']['dependencies'] + d['project']['optional-dependencies']['serve']; \
print('\n'.join(x for x in deps if not x.startswith('onnxruntime')))" > /tmp/req.txt \
 && pip install -r /tmp/req.txt 'onnxruntime-gpu>=1.18' 'tensorrt>=10.0' && rm /tmp/req.txt
COPY service ./service
COPY --from=bundle /bundle ./models/default
ENV CAE_MODEL_DIR=/app/models/default CAE_HOST=0.0.0.0 CAE_PORT=8000 CAE_BACKEND=auto PYTHONPATH=/app
USER cae
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
CMD ["python", "-m", "service"]

# the default target is the CPU image
FROM cpu
