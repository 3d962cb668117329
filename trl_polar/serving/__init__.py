"""Serving POLAR rewards over HTTP: the server (``trl-polar serve``) and the client (`PolarClient`).

- `protocol`: the wire models of every endpoint and every engine shape, and the one error envelope;
- `app`: the FastAPI routes; `service`: what they call; `batcher`: the one model thread; `metrics`: Prometheus text;
- `server`: `serve`, the uvicorn launch; `command`: the ``trl-polar serve`` options;
- `client`: `PolarClient` (transport, retries, failover); `backends`: one adapter per engine's wire shape.

Nothing here is imported by ``import trl_polar``; FastAPI and uvicorn only when a server is built.
"""
