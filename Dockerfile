# poller in a container: `docker build -t poller .` then
#   docker run --env-file /etc/poller/env -p 9102:9102 poller run --metrics-port 9102
# Secrets come from the environment (--env-file), never from the image; or from Docker
# secrets, which appear as files in /run/secrets/ (services: secrets: in compose):
#   environment: POLLER_API_TOKEN_FILE=/run/secrets/poller_api_token
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# poller listens on 127.0.0.1 by default, which `docker run -p` cannot reach.
ENV POLLER_METRICS_HOST=0.0.0.0

WORKDIR /src
COPY pyproject.toml setup.cfg README.md constraints.txt ./
COPY poller ./poller
# constraints.txt (`make lock`) pins every dependency: each build installs the same versions.
RUN pip install -c constraints.txt . && rm -rf /src

RUN groupadd --system --gid 10001 poller \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/poller --create-home \
        --shell /usr/sbin/nologin poller
# Numeric, so Kubernetes' runAsNonRoot can verify the user is not root without the image's passwd.
USER 10001:10001
# A SQLite database (the default) lands here; mount a volume, or use PostgreSQL.
WORKDIR /var/lib/poller
VOLUME ["/var/lib/poller"]
EXPOSE 9102

# The same verdict as /healthz, from the database's cycle history.
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s CMD ["poller", "-q", "health"]
ENTRYPOINT ["poller"]
CMD ["run"]
