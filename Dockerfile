# darkstore: the API, the Celery workers and the trainer share this image.
# Built from the same pins as the tests (constraints.txt: torch 2.14.1 / torchvision 0.29.1, whose PyPI builds
# carry CUDA and run on the CPU too), so a store made outside the container replays inside it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/darkstore
COPY constraints.txt pyproject.toml README.md ./
COPY darkstore ./darkstore
COPY darkstore_app ./darkstore_app
COPY storage ./storage
COPY teacher_service ./teacher_service
COPY student_trainer ./student_trainer
# every version comes from constraints.txt (pip -c), as in ./dev and CI
# hadolint ignore=DL3013
RUN pip install -c constraints.txt ".[service,s3,onnx,timm,hf,lm,tensorboard]" \
 && python -c "import torch, torchvision, onnxruntime, s3fs, timm, datasets, tensorboard, darkstore, teacher_service.api, teacher_service.celery_app" \
 && darkstore --help > /dev/null

# never run as root: stores and job records belong to this user
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin darkstore \
 && mkdir -p /darkstore /data \
 && chown darkstore:darkstore /darkstore /data
USER 1000:1000
ENV DARKSTORE_HOME=/darkstore \
    DARKSTORE_DATA_ROOTS=/data

EXPOSE 8000
# the default command is the API; compose gives the workers their own check and turns it off for one-shots
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["darkstore", "serve", "--host", "0.0.0.0", "--port", "8000"]
