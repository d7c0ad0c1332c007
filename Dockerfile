# darkstore: the API, the Celery workers and the trainer share this image.
# The base carries a CUDA build of PyTorch and torchvision; pip keeps them (they satisfy torch>=2.6).
# Another base: docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> .
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/darkstore
COPY pyproject.toml README.md ./
COPY darkstore ./darkstore
COPY darkstore_app ./darkstore_app
COPY storage ./storage
COPY teacher_service ./teacher_service
COPY student_trainer ./student_trainer
RUN pip install ".[service,s3]" \
 && python -c "import torch, torchvision, s3fs, darkstore, teacher_service.api, teacher_service.celery_app" \
 && darkstore --help > /dev/null

# never run as root: stores and job records belong to this user
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin darkstore \
 && mkdir -p /darkstore /data \
 && chown darkstore:darkstore /darkstore /data
USER darkstore
ENV DARKSTORE_HOME=/darkstore \
    DARKSTORE_DATA_ROOTS=/data

EXPOSE 8000
CMD ["darkstore", "serve", "--host", "0.0.0.0", "--port", "8000"]
