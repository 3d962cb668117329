"""Serving POLAR rewards over HTTP: the server (``trl-polar serve``) and the client (`PolarClient`).

- `settings`: `ServeSettings`, the server's options as one frozen object;
- `protocol`: the wire models of every endpoint and every engine shape; `errors`: the one error envelope;
- `app`: the FastAPI routes; `limits`: body size, body time and admission below them; `service`: what the routes
  call; `metrics`: Prometheus counters (``prometheus_client``);
- `server`: `serve`, the uvicorn launch (the ``trl-polar serve`` options are `trl_polar.cli.serve`);
- `client`: `PolarClient` (transport, retries, failover); `backends`: one adapter per engine's wire shape;
  `parity`: ``trl-polar check-engine``.

Nothing here is imported by ``import trl_polar``; FastAPI and uvicorn only when a server is built.
"""
