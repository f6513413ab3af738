# tenantctl: one image for every role (admin API, data-plane replica, worker, bootstrap job).
# Built by docker-compose.yml; the command chooses the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY control_plane ./control_plane
COPY data_plane ./data_plane
COPY infra ./infra
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app tenantctl \
    && mkdir -p /app/state && chown tenantctl /app/state

# Never root: the processes need no privilege, and a compromised replica must not get one.
USER tenantctl
ENV TENANTCTL_STATE_DIR=/app/state \
    TENANTCTL_ENVIRONMENT=production \
    TENANTCTL_LOG_FORMAT=json
EXPOSE 8000 8001
CMD ["tenantctl", "--help"]
