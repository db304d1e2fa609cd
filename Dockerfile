# syntax=docker/dockerfile:1
# MPC-API: the OpenAI-compatible gateway to LiteLLM, as a twistd daemon.
#
#   docker build -t mpc-api:latest .
#   docker run -d --name mpc-api -p 3000:3000 -e LITELLM_BASE_URL=http://litellm:4000 \
#       -e LITELLM_API_KEY=your-key --network ai-infra-net mpc-api:latest
#
# Configuration is by environment (PORT, LITELLM_BASE_URL, LITELLM_API_KEY, LITELLM_TIMEOUT,
# MPCAPI_*), a .env file in /app, or a TOML file named by MPCAPI_CONFIG: the documented
# defaults are in /app/etc/mpcapi.toml (mount your own copy and set MPCAPI_CONFIG to use one).

# --- build: install the project and its dependencies into a self-contained venv -----------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY setup.py pyproject.toml ./
COPY mpcapi ./mpcapi
COPY twisted ./twisted
# A plain (not editable) install; then build Twisted's plugin cache (dropin.cache) now, as the
# runtime user cannot write to site-packages, and check that twistd finds the plugin.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd mpcapi --help > /dev/null

# --- runtime: the venv, the config files, a non-root user -------------------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 1001 mpcapi \
    && useradd --system --uid 1001 --gid 1001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin mpcapi

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY etc ./etc
# The one writable place: the SQLite database of keys and usage, and the usage spool file
# (mount a volume here, or point MPCAPI_DATABASE_URL at PostgreSQL).
RUN mkdir /app/data && chown 1001:1001 /app/data
VOLUME /app/data

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=3000 \
    LITELLM_BASE_URL=http://litellm:4000 \
    MPCAPI_DATABASE_URL=sqlite:////app/data/mpcapi.db \
    MPCAPI_USAGE_SPOOL=/app/data/usage-spool.jsonl \
    MPCAPI_ENV=production

USER 1001:1001
EXPOSE 3000

# slim has neither wget nor curl: ask /health with Python's urllib (any error or non-2xx exits 1).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://localhost:%s/health' % os.environ.get('PORT', '3000'), timeout=5)"]

# -n: stay in the foreground and log to stdout; --pidfile=: no pid file (/app is read-only to us).
CMD ["twistd", "-n", "--pidfile=", "mpcapi"]
