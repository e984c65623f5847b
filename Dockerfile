# syntax=docker/dockerfile:1
# runner worker image: `docker build -t runner .`, then `docker run --rm -e RUNNER_DATABASE_URL=... runner`.
#
# Stage 1 builds runner's wheel and a wheel of every dependency at the versions constraints.txt pins (the
# lock ./dev and CI install from; a compiler is available here only). Stage 2 is python:3.12-slim with those
# wheels installed offline: no compiler, no build tools, a non-root user, runner as the entrypoint and
# `worker` as the default command. No extras: no embedded PostgreSQL (set RUNNER_DATABASE_URL) and no
# in-process chain (without RUNNER_CHAIN_URL the consensus loops stay off, with one info line).
#
# Shutdown: SIGTERM makes the worker stop claiming, lets running jobs finish for RUNNER_SHUTDOWN_GRACE
# seconds (default 30), cancels what is left (those jobs go back to pending without using an attempt),
# waits up to 10 s for them to unwind and writes the last completions. The runtime's kill deadline must
# cover all of it: give it at least RUNNER_SHUTDOWN_GRACE + 15 s.
#   docker stop -t 45 <container>            (docker's default of 10 s would cut the grace short)
#   compose: stop_grace_period: 45s          (set in compose.yaml)
#   k8s:     terminationGracePeriodSeconds: 45 (set in deploy/k8s/deployment.yaml)
# A job SIGKILLed past the deadline is not lost: its lease expires and another worker rescues it.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt ./
RUN pip install -c constraints.txt build
COPY pyproject.toml README.md ./
COPY config ./config
COPY runner ./runner
COPY jobs ./jobs
RUN python -m build --wheel --outdir /wheels . \
 && pip wheel --wheel-dir /wheels -c constraints.txt /wheels/runner_pg-*.whl

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RUNNER_HOME=/home/runner/.runner \
    RUNNER_HTTP_HOST=0.0.0.0 \
    RUNNER_HTTP_PORT=9187 \
    RUNNER_LOG_FORMAT=json
RUN groupadd --system --gid 10001 runner \
 && useradd --system --uid 10001 --gid runner --home-dir /home/runner --create-home --shell /usr/sbin/nologin runner
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels runner-pg \
 && runner --help >/dev/null
WORKDIR /home/runner
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 9187
STOPSIGNAL SIGTERM
# /healthz is 503 when a worker loop died or the event loop lags; urllib raises on it, so exit is 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RUNNER_HTTP_PORT', '9187'), timeout=4)" || exit 1
ENTRYPOINT ["runner"]
CMD ["worker"]
