# PausePoint in a container: docker build -t pausepoint . &&
#   docker run -p 8080:8080 -v pausepoint-data:/data pausepoint
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PAUSEPOINT_SERVER_HOST=0.0.0.0 \
    PAUSEPOINT_DATABASE_PATH=/data/pausepoint.db

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY pausepoint.py schema.sql config.example.toml ./
COPY templates/ templates/
COPY static/ static/

RUN useradd --system --uid 10001 --home-dir /data pausepoint \
    && mkdir -p /data && chown pausepoint /data
USER pausepoint
VOLUME /data
EXPOSE 8080

# Asks where the server listens: the address it was given (PAUSEPOINT_SERVER_HOST, else server.host in
# ./config.toml; loopback when that is every address, 0.0.0.0 or ::, and a server on :: takes IPv6 alone)
# and its port (PAUSEPOINT_SERVER_PORT, else server.port in ./config.toml, else 8080). Not --host or --port
# given to the command: set those in the environment or the file instead.
# Straight to the server, never through an http_proxy that Docker may pass in from the client's config:
# a proxy would answer for a server that is down.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, tomllib, urllib.request; file = tomllib.loads(open('config.toml', encoding='utf-8-sig').read()).get('server', {}) if os.path.exists('config.toml') else {}; host = (os.environ.get('PAUSEPOINT_SERVER_HOST') or str(file.get('host', ''))).strip() or '127.0.0.1'; host = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(host, host); host = f'[{host}]' if ':' in host else host; port = (os.environ.get('PAUSEPOINT_SERVER_PORT') or str(file.get('port', 8080))).strip(); sys.exit(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f'http://{host}:{port}/healthz', timeout=4).status != 200)"]

# Set PAUSEPOINT_SERVER_BASE_URL to the public URL humans open respond links on.
CMD ["python", "pausepoint.py"]
