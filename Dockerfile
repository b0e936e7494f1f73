# syntax=docker/dockerfile:1
# Two images from one file:
#   api     the HTTP service, the scheduler, migrations, Flower; no torch (docker build --target api)
#   worker  the Celery GPU worker; PyPI's torch wheels bundle CUDA, so one image runs on a GPU
#           when the host offers one (NVIDIA driver + container toolkit) and on the CPU otherwise
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LETHE_HOME=/var/lib/lethe
RUN groupadd --system --gid 10001 lethe \
 && useradd --system --uid 10001 --gid lethe --home-dir /var/lib/lethe --shell /usr/sbin/nologin lethe \
 && install -d -o lethe -g lethe /var/lib/lethe /var/lib/lethe/store \
 && install -d -m 0700 -o lethe -g lethe /var/lib/lethe/keys
WORKDIR /opt/lethe
# Dependencies are installed from pyproject.toml alone (an editable install of empty packages), so
# a code change does not reinstall them. The code is copied over the stubs afterwards; editable,
# because the migrations and the dashboard are read from this source tree.
COPY pyproject.toml ./
RUN mkdir app worker && touch README.md app/__init__.py worker/__init__.py

FROM base AS api
RUN pip install -e ".[ops]"
COPY . .
USER lethe
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# One process per container: Prometheus then sees one consistent set of HTTP counters. Scale by
# running more api containers behind a load balancer.
CMD ["lethe", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
RUN pip install -e ".[worker]"
COPY . .
USER lethe
# The parent process answers pings while a pool process holds the GPU, so a busy worker is healthy.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.celery_app:celery_app inspect ping --destination celery@$HOSTNAME --timeout 10"]
# --events feeds Flower's task metrics.
CMD ["celery", "-A", "worker.celery_app:celery_app", "worker", "--loglevel=INFO", "--events"]
