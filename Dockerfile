# syntax=docker/dockerfile:1
# conduit-sidecar: `docker build -t conduit-sidecar:0.1.0 .`
# The same image serves the sidecar (`serve`, the default) and the injection webhook
# (`inject-webhook`). It runs as uid 10001 and writes nothing to its root filesystem, so
# it works with readOnlyRootFilesystem: true.

FROM python:3.11-slim AS build
# A C compiler for the Cython relay (_relay.pyx), and OpenSSL's headers so that it
# encrypts TLS legs itself (the runtime's libssl3 is the one Python's ssl uses); the
# dependencies come as wheels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md _relay.pyx _relay.pxd _tls.h ./
COPY conduit_sidecar/ conduit_sidecar/
# The project's wheel plus a wheel of every dependency, so the runtime stage installs
# offline and needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 conduit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin conduit
# Bind-mounted, not copied: the wheels never become a layer of the final image. pip
# compiles the installed packages' .pyc files here, so nothing needs writing at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels conduit-sidecar
# The base image deletes its standard library's .pyc files, and with
# PYTHONDONTWRITEBYTECODE and a read-only root none are ever written: every start would
# compile asyncio, ssl, logging, email, http... again (about 0.9 s of CPU and 0.8 MiB of
# RSS per start, docs/kubernetes.md). Compile them once, into the image (about 13 MB),
# at the level the sidecar runs at: PYTHONOPTIMIZE=2 leaves out docstrings (and
# asserts, which the sidecar only uses to narrow types), about 1 MiB of RSS per pod
# (docs/benchmarks.md, "Base RSS"); the installed packages' .opt-2.pyc files too.
RUN python -m compileall -q -j 0 -o 2 -x '/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip)/' \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# PYTHONMALLOC=malloc: small objects from glibc's malloc, not CPython's 1 MiB arenas.
# A burst of sessions opened at once leaves arenas that a few survivors keep for good
# (1.4-1.5x the at-rest RSS after 4,000 at once); glibc's free pages go back at the trim
# after it (1.15x), for 0.5-0.7 MiB more at start (docs/benchmarks.md, "A burst at once").
ENV PYTHONOPTIMIZE=2 PYTHONMALLOC=malloc
USER 10001:10001
EXPOSE 8080 8443 9464
# Exec form: the sidecar is PID 1 and receives SIGTERM itself (it drains, then exits).
ENTRYPOINT ["conduit-sidecar"]
CMD ["serve"]
