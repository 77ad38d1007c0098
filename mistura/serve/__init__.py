"""Serving a checkpoint over HTTP: `mistura serve CKPT`, an OpenAI-compatible server.

    engine.py    continuous batching over a paged KV cache (prefix caching, preemption)
    blocks.py    which KV block holds what: reference counts, prefix-cache names
    runner.py    the thread that owns the engine, and the asyncio side that talks to it
    protocol.py  OpenAI's request bodies, response objects and error bodies
    metrics.py   the Prometheus metrics of /metrics
    app.py       the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics

Nothing here is imported with `mistura`: fastapi, uvicorn and prometheus_client come
with the `serve` extra (`pip install -e ".[serve]"`).
"""
