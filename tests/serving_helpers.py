"""Helpers for the serving tests: real server subprocesses and in-thread stand-in servers, on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
API_KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m trl_polar.cli serve`` on a free loopback port, as a user would start it."""

    def __init__(self, model_dir: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "trl_polar.cli", "serve", "--model", model_dir, "--host", HOST]
        cmd += ["--port", str(self.port), "--device", "cpu", "--log-level", "warning", *args]
        # A file, not a pipe: a pipe nobody reads fills up and blocks the server's logging.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        _LIVE.append(self)

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server on {self.url} not ready after {timeout} s")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_LIVE: list[ServerProcess] = []


@atexit.register
def _kill_leftovers() -> None:
    for server in _LIVE:
        if server.proc.poll() is None:
            server.proc.kill()


def start_servers(*specs: tuple[str, tuple[str, ...]]) -> list[ServerProcess]:
    """Start several servers at once (their start-up, mostly imports, overlaps), then wait for all."""
    servers = [ServerProcess(model_dir, *args) for model_dir, args in specs]
    return [s.wait_ready() for s in servers]


class ThreadServer:
    """A small ASGI app served by uvicorn in a thread of the test process (for stand-ins of other engines)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive connection over asyncio streams.

    The load test sends thousands of requests from one process on a shared 2-core machine; httpx spends several
    times more CPU per request than this, and that CPU is taken from the server under test. Real HTTP all the same:
    uvicorn parses every request, and every response is parsed here (status line, Content-Length, body).
    """

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
        self._reader = self._writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        request = f"POST {path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        self._writer.write(request)
        await self._writer.drain()
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        payload = await self._reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None


def schema_problems(value, schema: dict, root: dict, where: str = "$") -> list[str]:
    """Where ``value`` breaks the JSON schema ``schema`` ($refs resolved in ``root``): the subset of JSON Schema
    that OpenAPI documents generated by FastAPI and pydantic use. Empty when it conforms."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_problems(value, target, root, where)
    problems: list[str] = []
    for key in ("anyOf", "oneOf"):
        if key in schema and all(schema_problems(value, s, root, where) for s in schema[key]):
            problems.append(f"{where}: matches none of {key}")
    for sub in schema.get("allOf", []):
        problems += schema_problems(value, sub, root, where)
    kinds = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    kind = schema.get("type")
    if kind is not None and not any(kinds[k](value) for k in ([kind] if isinstance(kind, str) else kind)):
        return [*problems, f"{where}: {value!r:.60} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: {value!r} is not {schema['const']!r}")
    if isinstance(value, dict):
        problems += [f"{where}: no {name!r}" for name in schema.get("required", []) if name not in value]
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                problems += schema_problems(item, properties[name], root, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}: unknown {name!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += schema_problems(item, schema["additionalProperties"], root, f"{where}.{name}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{where}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            problems += schema_problems(item, schema.get("items", {}), root, f"{where}[{i}]")
    if kinds["number"](value):
        if "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
            problems.append(f"{where}: {value} <= {schema['exclusiveMinimum']}")
        if "minimum" in schema and not value >= schema["minimum"]:
            problems.append(f"{where}: {value} < {schema['minimum']}")
    return problems
