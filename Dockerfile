# pop3proxy: plaintext POP3 in on port 110, verified implicit TLS (POP3S) out.
#
#   docker build -t pop3proxy .
#   docker run --rm -p 110:110 -e POP3PROXY_UPSTREAM=mail.example.com:995 pop3proxy
#
# Every setting is an environment variable POP3PROXY_<SETTING> (`pop3proxy serve --help`);
# see docs/deployment.md for the sidecar, Kubernetes and systemd shapes.
#
# tests/test_deploy.py parses this file: it lints it with hadolint, replays the build stage's
# COPY and RUN steps in a fresh virtualenv (with the paths below moved under a temporary
# directory), then runs ENTRYPOINT + CMD and HEALTHCHECK with these ENV values against a real
# Dovecot upstream. Keep paths in variables, commands in exec (JSON) form.

# ---- build stage: the wheel, and a virtualenv with it and its dependencies ----------------
FROM python:3.11-slim-bookworm AS build

ENV VIRTUAL_ENV=/opt/pop3proxy \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# The build context is only pyproject.toml, README.md and pop3proxy/ (see .dockerignore).
COPY . .

# The runtime virtualenv has no pip: pip installs into it from outside (--python). All
# dependencies ship as binary wheels for this platform, so no compiler is needed here either.
RUN pip wheel --no-deps --wheel-dir dist . \
    && python -m venv --without-pip "$VIRTUAL_ENV" \
    && pip --python "$VIRTUAL_ENV/bin/python" install --only-binary=:all: dist/pop3proxy-*.whl

# ---- final stage: the same base, the virtualenv, an unprivileged user ----------------------
FROM python:3.11-slim-bookworm

ENV VIRTUAL_ENV=/opt/pop3proxy \
    POP3PROXY_STATE_DIR=/var/lib/pop3proxy

# A fixed numeric UID/GID so that Kubernetes' runAsNonRoot can check it and volumes can be
# chowned to it. pip/setuptools/wheel of the base image are removed: nothing here builds or
# installs packages at run time.
RUN groupadd --system --gid 10110 pop3proxy \
    && useradd --system --uid 10110 --gid pop3proxy --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin pop3proxy \
    && install -d -o pop3proxy -g pop3proxy -m 0750 "$POP3PROXY_STATE_DIR" \
    && python -m pip uninstall --yes --quiet pip setuptools wheel

COPY --from=build $VIRTUAL_ENV $VIRTUAL_ENV

# Listen on port 110 of every interface of the container. An unprivileged process may bind it
# because Docker (20.10 and later) and containerd (2.0 and later) set
# net.ipv4.ip_unprivileged_port_start=0 in each new network namespace; elsewhere set that
# sysctl (docker run --sysctl ...), or listen on a high port and map 110 to it
# (docs/deployment.md).
# The admin endpoint (/healthz, /readyz, /metrics) stays on 127.0.0.1:9110 unless
# POP3PROXY_ADMIN says otherwise (Kubernetes probes need 0.0.0.0:9110).
ENV PATH=$VIRTUAL_ENV/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    POP3PROXY_LISTEN=0.0.0.0:110 \
    POP3PROXY_ADMIN=127.0.0.1:9110 \
    POP3PROXY_LOG_FORMAT=json \
    POP3PROXY_LOG_LEVEL=info

# The client inventory (SQLite); one per container, never on a network file system.
VOLUME $POP3PROXY_STATE_DIR
WORKDIR $POP3PROXY_STATE_DIR
USER 10110:10110
EXPOSE 110

# SIGTERM (docker stop, Kubernetes) makes pop3proxy stop accepting and drain open sessions for
# up to POP3PROXY_DRAIN_TIMEOUT seconds (default 30): give it longer than that to stop
# (docker stop --time 40, terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM

# Exit 0 when /readyz says ready: the upstream answered with a verified TLS handshake and +OK.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["pop3proxy", "healthcheck", "--timeout", "5"]

ENTRYPOINT ["pop3proxy"]
CMD ["serve"]
