# The lstream worker image: numpy + numba inference, no torch (training happens elsewhere; the
# worker only reads the model artifact). Build: docker build -t lstream .
# Reproducible: the Python patch release is pinned, and every runtime dependency is installed at
# the version in constraints.txt (generated from a tested environment: tests/deploy/pins.py).
FROM python:3.11.7-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/home/lstream/.cache/numba \
    LSTREAM_MODEL=/app/models/default \
    LSTREAM_WEB_HOST=0.0.0.0 \
    LSTREAM_WEB_PORT=6066

WORKDIR /app

# Dependencies first, from the pins alone (a layer that survives code changes), then the code.
# No extras: train would pull torch, dev the embedded test broker.
COPY constraints.txt ./
RUN pip install -r constraints.txt
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY state ./state
COPY worker ./worker
COPY lstream ./lstream
COPY series ./series
COPY evaluation ./evaluation
COPY training ./training
COPY models ./models
# The sources are removed after installing, so that everything (and numba's cache) refers to the
# installed copy; /app keeps only the model. The check fails the build if torch slipped in.
RUN pip install -c constraints.txt --no-deps . \
    && pip check \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && rm -rf kernels state worker lstream series evaluation training build *.egg-info \
    && useradd --create-home --uid 10001 lstream

USER lstream

# Compile the numba kernels once at build time (cached under NUMBA_CACHE_DIR), so a new replica
# starts serving in seconds instead of compiling first.
RUN python -c "import numpy as np; from kernels import load_model; from kernels.engine import Engine; \
m = load_model('/app/models/default'); e = Engine(m); s = e.new_states(2); \
e.advance(s, np.ones((2, m.input_size)), np.full(2, 1.7e9))"

EXPOSE 6066
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LSTREAM_WEB_PORT', '6066'), timeout=3)"]

ENTRYPOINT ["lstream"]
CMD ["worker"]
