# m2rec serving image: the FastAPI service only (the service never imports training/).
#
#   docker build -t m2rec .
#   docker run -p 8000:8000 -v "$PWD/artifacts:/artifacts:ro" m2rec
#
# The model artifact is mounted, not baked: /artifacts is an artifact root with a `current`
# pointer (or one version directory), so a new model needs no new image. To bake one instead:
#   FROM m2rec
#   COPY --chown=m2rec:m2rec artifacts /artifacts
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first and from the PyTorch CPU index: the PyPI build of torch for Linux pulls in the CUDA
# libraries (gigabytes) that a CPU-only server never loads. The pin matches pyproject.toml; the
# CPU wheel's version is 2.13.0+cpu, which satisfies `torch==2.13.0` in the install below, so pip
# keeps it instead of fetching the CUDA build. Its own layer: it changes far less often than our code.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY service ./service
# `pip install .` without extras: the service and its own dependencies only (training's, the `train`
# extra, stay out). Pure Python plus wheels (FAISS, torch): no compiler. The source tree goes once
# installed (it would shadow the installed package).
RUN pip install . && rm -rf /app/build /app/service

# Non-root: the process needs to write only its SQLite store (when no Redis URL is given) and the
# optional index snapshots, both under /data.
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin m2rec \
    && mkdir -p /data /artifacts \
    && chown m2rec:m2rec /data
USER m2rec

ENV M2REC_HOST=0.0.0.0 \
    M2REC_PORT=8000 \
    M2REC_ARTIFACT_PATH=/artifacts \
    M2REC_STORE_URL=/data/m2rec.sqlite3
EXPOSE 8000

# slim has no curl: the standard library asks /healthz (urlopen raises, so exits non-zero, on errors)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('M2REC_PORT', '8000'), timeout=3)"]

CMD ["python", "-m", "service"]
