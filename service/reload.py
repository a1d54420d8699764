"""Hot reload: a worker follows its model's production pointer without a restart.

A model named without a version (``CLF_IMAGE_MODEL=digits-cnn``) tracks the production pointer
that ``python -m modelstore promote`` (or a retraining) moves. Every
``CLF_RELOAD_INTERVAL_S`` each worker stats the pointer file; when the production version
changes it loads the new version beside the old one (its own ONNX Runtime session, batcher and
warm-up, off the event loop), then swaps it in with one assignment. Requests that already hold
the old version finish on it (it drains, bounded by the request timeout), new requests go to the
new one: no request fails during the switch. A version that fails to load (or to warm up) is
refused: the old one keeps serving, the failure is logged and counted
(``clf_model_reloads_total{result="failed"}``), and that version is not retried until the
pointer moves again. A worker that missed an intermediate version (the pointer moved twice
between two of its checks) then falls back to the newest earlier production version in the
pointer's history, so every worker ends on the same version.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from modelstore import registry

from .batching import cancel_task
from .metrics import get_metrics
from .served import ServedModel, Slot

logger = logging.getLogger(__name__)


def tracks_production(tag: str) -> bool:
    """A tag without a version, or ``name:production``, follows the production pointer."""
    name, _, version = tag.partition(":")
    return bool(name) and version in ("", "production")


class Reloader:
    def __init__(self, slot: Slot, name: str, build: Callable[[str], ServedModel],
                 interval_s: float, warmup_batches: int, drain_timeout_s: float) -> None:
        self.slot = slot
        self.name = name
        self.build = build  # "name:version" -> an unstarted served model (runs in a thread)
        self.interval_s = interval_s
        self.warmup_batches = warmup_batches
        self.drain_timeout_s = drain_timeout_s
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the pointer file
        self._refused: str | None = None
        self._task: asyncio.Task | None = None
        self._reloads = get_metrics().reloads

    def start(self) -> None:
        self._seen = self._stat()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"reload-{self.name}")

    async def stop(self) -> None:
        await cancel_task(self._task)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = registry.pointer_path(self.name).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the reloader must outlive any one bad check
                logger.exception("hot reload check of %s failed", self.name)

    async def check(self) -> bool:
        """Reload if the production version moved; True when a new version was swapped in."""
        seen = self._stat()
        if seen == self._seen:
            return False
        self._seen = seen
        loop = asyncio.get_running_loop()
        try:
            pointer = await loop.run_in_executor(None, registry.read_pointer, self.name)
        except registry.RegistryError as exc:
            logger.error("hot reload of %s: cannot read the production pointer: %s", self.name, exc)
            self._reloads.labels(self.name, "failed").inc()
            return False
        if pointer is None or pointer.version in (self.slot.current.version, self._refused):
            return False
        if await self.reload(pointer.version):
            self._refused = None
            return True
        self._refused = pointer.version
        # Refused. A worker that missed the versions in between (the pointer moved twice
        # between two checks) converges on the newest earlier production version it can load,
        # so all workers end on the same one.
        for older in pointer.history:
            if older == self.slot.current.version:
                break
            if await self.reload(older):
                return True
        return False

    async def reload(self, version: str) -> bool:
        old = self.slot.current
        tag = f"{self.name}:{version}"
        logger.info("hot reload: loading %s (serving %s:%s)", tag, self.name, old.version)
        new: ServedModel | None = None
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, self.build, tag)
            if new.labels != old.labels:
                logger.warning("hot reload: %s has labels %s, %s:%s had %s", tag,
                               list(new.labels), self.name, old.version, list(old.labels))
            await new.start(self.warmup_batches)
        except Exception:
            logger.exception("hot reload: %s failed to load; %s:%s keeps serving", tag,
                             self.name, old.version)
            self._reloads.labels(self.name, "failed").inc()
            if new is not None:
                new.retire()
                await new.stop()
            return False
        self.slot.current = new  # from here on, new requests go to the new version
        old.retire()
        self._reloads.labels(self.name, "loaded").inc()
        logger.info("hot reload: %s serving; draining %s:%s", tag, self.name, old.version)
        await old.drain(self.drain_timeout_s)
        await old.stop()
        return True
