# syntax=docker/dockerfile:1
# Build stage: dependencies first (cached while only the source changes), then the app.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py && pip install . && pip uninstall -y coldmail-webhooks
COPY app ./app
COPY alembic ./alembic
RUN pip install --no-deps .

# Runtime stage: the virtual environment only, run by an unprivileged user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin coldmail \
  && mkdir -p /var/lib/coldmail/spool && chown -R coldmail /var/lib/coldmail
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LOG_FORMAT=json \
  SPOOL_DIR=/var/lib/coldmail/spool
# Deliveries wait here while PostgreSQL is unreachable: keep it on a volume.
VOLUME /var/lib/coldmail/spool
USER coldmail
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["coldmail-webhooks", "serve", "--host", "0.0.0.0", "--port", "8000"]
