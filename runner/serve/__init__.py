"""Serving: an OpenAI-compatible HTTP server over continuous batching.

scheduler.py owns the batch and the model loop (one thread, a BatchDecoder) and knows nothing
of HTTP; app.py holds the routes, schemas.py the request schemas, metrics.py the Prometheus
counters; server.py loads the recipe in the background while uvicorn already answers /health.
"""
