"""An in-process stand-in for the part of Ray that the callers' reward paths touch.

Ray itself is a 250 MB install whose actors need a running cluster; the contract tests run the callers' own code
with this instead. An actor is an instance built on a thread of its own with its own event loop (as a Ray async
actor has); ``handle.method.remote(...)`` runs the method there and returns a resolved `ObjectRef`; `get` unwraps
refs. Nothing here scores, decides or reshapes data: it only moves calls to where the caller's code expects them.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from ray import actor, util  # noqa: F401  (submodules the callers import by attribute)


class ObjectRef:
    """A finished call's value (or the exception it raised)."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _Loop:
    """One thread running one event loop: where an actor lives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="ray-standin-actor", daemon=True).start()
        ready.wait()

    def call(self, fn, *args, **kwargs) -> ObjectRef:
        async def invoke():
            out = fn(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        try:
            return ObjectRef(asyncio.run_coroutine_threadsafe(invoke(), self.loop).result())
        except Exception as err:
            return ObjectRef(error=err)


class _Method:
    def __init__(self, home: _Loop, bound) -> None:
        self._home, self._bound = home, bound

    def remote(self, *args, **kwargs) -> ObjectRef:
        return self._home.call(self._bound, *args, **kwargs)

    def options(self, **_: Any) -> _Method:
        return self


class _ActorHandle:
    def __init__(self, cls: type, args: tuple, kwargs: dict) -> None:
        self._home = _Loop()
        self._instance = self._home.call(lambda: cls(*args, **kwargs)).result()

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._home, getattr(self._instance, name))


class _ActorClass:
    def __init__(self, cls: type) -> None:
        self._cls = cls

    def options(self, **_: Any) -> _ActorClass:
        return self

    def remote(self, *args, **kwargs) -> _ActorHandle:
        return _ActorHandle(self._cls, args, kwargs)


class _RemoteFunction:
    def __init__(self, fn) -> None:
        self._fn = fn

    def options(self, **_: Any) -> _RemoteFunction:
        return self

    def remote(self, *args, **kwargs) -> ObjectRef:
        try:
            return ObjectRef(self._fn(*args, **kwargs))
        except Exception as err:
            return ObjectRef(error=err)


def remote(*args, **options):
    """``@ray.remote``, ``@ray.remote(num_cpus=...)`` and ``ray.remote(cls)``."""

    def wrap(target):
        return _ActorClass(target) if inspect.isclass(target) else _RemoteFunction(target)

    if len(args) == 1 and callable(args[0]) and not options:
        return wrap(args[0])
    return wrap


def get(refs, timeout: float | None = None):
    if isinstance(refs, list):
        return [get(r) for r in refs]
    return refs.result() if isinstance(refs, ObjectRef) else refs


def put(value: Any) -> ObjectRef:
    return ObjectRef(value)


def is_initialized() -> bool:
    return False


def init(*_: Any, **__: Any) -> None:
    raise RuntimeError("the Ray stand-in starts no cluster: drive the caller's classes directly")


def nodes() -> list[dict]:
    return [{"NodeID": "local", "Alive": True, "Resources": {"CPU": 1.0}}]


def get_runtime_context():
    raise RuntimeError("the Ray stand-in has no runtime context")
