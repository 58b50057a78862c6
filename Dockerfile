# The gateway's image (the inference tier runs the official vLLM image instead).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/bastion
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY inference ./inference
COPY monitors ./monitors
COPY compliance ./compliance
RUN pip install --no-compile ".[gateway]" \
    && useradd --system --uid 10001 --home-dir /var/lib/bastion --create-home bastion
USER bastion
WORKDIR /var/lib/bastion
EXPOSE 8080
ENTRYPOINT ["bastion"]
CMD ["serve", "--config", "/etc/bastion/bastion.yaml"]
