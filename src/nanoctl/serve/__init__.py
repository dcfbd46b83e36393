"""`nanoctl serve`: an OpenAI-compatible server over continuously batched decoding.

- scheduler.py: one thread per device decodes every running request's rows together; Router spreads
  requests over several schedulers (--gpus N).
- protocol.py: request parsing and validation into typed objects, limits, stop strings, OpenAI's
  response, chunk and error objects (pydantic only, no FastAPI).
- api.py: the FastAPI app (routes, auth / drain / body-size gate, SSE streams).
- metrics.py: the Prometheus registry of one app.
- server.py: `ServeOptions` and `serve()`: bind, load in the background, uvicorn, SIGTERM drain.

Nothing is imported here: the CLI imports `server` for its options and must stay light.
"""
