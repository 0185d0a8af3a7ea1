# Build stage: the dependencies first, read from pyproject.toml alone (so this layer stays
# cached while the source or the README change), then the app without its dependencies.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >requirements.txt \
  && pip install -r requirements.txt
COPY README.md ./
COPY app ./app
COPY alembic ./alembic
RUN pip install --no-deps . && pip uninstall -y pip setuptools wheel

# Runtime stage: the virtual environment only (no pip, no setuptools), an unprivileged user.
FROM python:3.11-slim
RUN rm -rf /usr/local/lib/python3*/site-packages/pip* /usr/local/lib/python3*/site-packages/setuptools* \
    /usr/local/lib/python3*/site-packages/wheel* /usr/local/bin/pip* \
  && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin coldmail \
  && mkdir -p /var/lib/coldmail/spool && chown -R coldmail:0 /var/lib/coldmail \
  && chmod -R 2770 /var/lib/coldmail
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LOG_FORMAT=json \
  SPOOL_DIR=/var/lib/coldmail/spool
# Deliveries wait here while PostgreSQL is unreachable: keep it on a volume.
VOLUME /var/lib/coldmail/spool
USER coldmail
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# `docker run IMAGE migrate` (or any other command) works; the default serves.
ENTRYPOINT ["coldmail-webhooks"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
