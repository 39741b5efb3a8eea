# The training image for deploy/k8s/training/pretrain-job.yaml (torchrun, CUDA, no service):
#   docker build -f deploy/training.Dockerfile -t cae-train:latest .
ARG TORCH_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${TORCH_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cae
WORKDIR /app
COPY pyproject.toml README.md ./
COPY training ./training
COPY export ./export
COPY service ./service
# the base image's torch satisfies the `train` extra's torch>=2.6, so pip keeps it
RUN pip install -e '.[train]' && python -c "import torch, training.models"
USER cae
CMD ["python", "training/run.py", "--help"]
