# The gateway image: API (gunicorn + uvicorn workers), Celery worker and beat
# all run from it with different commands (see docker-compose.yml, railway.toml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /srv

RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /srv --shell /usr/sbin/nologin gateway

# Dependencies first (layer cache): exactly uv.lock's versions, hash-checked by pip, through a
# pinned and hash-checked uv that only exports the lock and is removed again; then the package.
COPY pyproject.toml uv.lock README.md ./
COPY scripts/requirements/uv.txt ./scripts/requirements/uv.txt
RUN pip install --no-compile --require-hashes --no-deps -r scripts/requirements/uv.txt \
 && uv export --frozen --no-emit-project --no-dev --format requirements-txt -o /tmp/requirements.txt \
 && pip install --no-compile --require-hashes --no-deps -r /tmp/requirements.txt \
 && pip uninstall -y uv && rm -rf /tmp/requirements.txt /root/.cache
COPY app ./app
# uvicorn[standard] (uvloop, httptools) and hiredis must have installed as wheels.
RUN pip install --no-compile --no-deps . \
 && python -c "import uvloop, httptools, hiredis" \
 && rm -rf /root/.cache

COPY gunicorn.conf.py ./
COPY scripts/demo_backend.py ./scripts/demo_backend.py

USER gateway

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=3)" || exit 1

# gunicorn.conf.py holds the worker class and its limits (app/ops/server.py: request
# read timeout, connection cap per worker from GUNICORN_WORKER_CONNECTIONS and the
# open-file limit); always start through it, never with a bare uvicorn worker.
CMD ["sh", "-c", "exec gunicorn -c gunicorn.conf.py --bind 0.0.0.0:${PORT:-8000} app.main:app"]
