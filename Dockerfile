# The Dagster webserver over roadwork_assets, CPU torch.
#   docker build -t roadwork-assets .
#   docker run -p 3000:3000 -v $HOME/.roadwork:/data/roadwork roadwork-assets
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ROADWORK_HOME=/data/roadwork \
    DAGSTER_HOME=/data/roadwork/dagster_home

RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU wheels first, so the project's pins resolve to them instead of CUDA builds.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md dagster.yaml workspace.yaml ./
COPY roadwork_assets ./roadwork_assets
RUN pip install --no-cache-dir .

EXPOSE 3000
# The artifact root may be a fresh volume: create the instance folder at start.
CMD ["sh", "-c", "mkdir -p \"$DAGSTER_HOME\" && [ -f \"$DAGSTER_HOME/dagster.yaml\" ] || cp dagster.yaml \"$DAGSTER_HOME/\"; exec dagster dev -h 0.0.0.0 -p 3000 -w workspace.yaml"]
