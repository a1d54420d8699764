"""Which version of a model is in production: a pointer file beside BentoML's own ``latest``.

BentoML's model store keeps ``models/<name>/<version>/`` folders and a plain ``latest`` file;
``Store.list`` only looks at folders, so ``models/<name>/production.json`` can live beside them:

    {"name": ..., "version": <production>, "history": [earlier production versions, newest
     first], "updated_at": <ISO 8601 UTC>, "reason": "promote" | "rollback" | "first export" | ...}

The pointer file is the truth. Every change is one atomic step: the new JSON goes to a temp file
in the same folder, is fsynced, ``os.replace``-d onto ``production.json`` and the folder is
fsynced, so a crash leaves the old pointer or the new one, never neither and never a torn file.
Writers serialise on ``flock`` of ``production.lock``; readers need no lock. A pointer that does
not parse is an error naming the file, never a silent fall-back to ``latest``.

After the replace, the change is appended to ``production.log.jsonl`` (time, from, to, reason,
user): an audit trail, which a crash between the two steps can leave one change short.

``python -m modelstore list|show|promote|rollback`` (``modelstore/cli.py``) is the command line
to all of this.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import json
import logging
import os
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import _bentoml
from .layout import METRICS_FILE, REQUIRED_FILES

if TYPE_CHECKING:  # bentoml is imported where used
    from ._bentoml import Model, ModelStore

POINTER_FILE, LOG_FILE, LOCK_FILE = "production.json", "production.log.jsonl", "production.lock"
_TEMP_PREFIX, _TEMP_SUFFIX = ".production.", ".tmp"
# Test hook: see _crash_point. Not CLF_-prefixed: the service rejects unknown CLF_ variables.
CRASH_ENV = "_CLF_REGISTRY_CRASH_AT"

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says what to do instead."""


@dataclass(frozen=True)
class Pointer:
    name: str
    version: str  # the production version
    history: tuple[str, ...]  # earlier production versions, most recent first (for rollback)
    updated_at: str  # ISO 8601 UTC
    reason: str  # why it was set: "promote", "rollback", "first export" or free text


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    created_at: str
    task: str  # the model's "task" label: image-classification or text-classification
    metrics: dict  # the version's metrics.json, or {}
    production: bool
    path: Path


def model_store(store: "ModelStore | None" = None) -> "ModelStore":
    """``store``, or the process's default store ($BENTOML_HOME/models)."""
    return store if store is not None else _bentoml.default_store()


def pointer_path(name: str, store: "ModelStore | None" = None) -> Path:
    """``<models dir>/<name>/production.json``."""
    return Path(model_store(store)._path) / _name(name) / POINTER_FILE


def read_pointer(name: str, store: "ModelStore | None" = None) -> Pointer | None:
    """The production pointer of ``name``, or None if it has none; RegistryError if corrupt."""
    path = pointer_path(name, store)
    try:
        data = json.loads(path.read_text())
        pointer = Pointer(name=data["name"], version=data["version"],
                          history=tuple(data["history"]), updated_at=data["updated_at"],
                          reason=data["reason"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(_corrupt(path, f"{type(exc).__name__}: {exc}")) from None
    fields = (pointer.name, pointer.version, *pointer.history, pointer.updated_at, pointer.reason)
    if (not isinstance(data["history"], list) or not all(isinstance(f, str) for f in fields)
            or pointer.name != _name(name)):
        raise RegistryError(_corrupt(path, "unexpected field types or model name"))
    return pointer


def production(name: str, store: "ModelStore | None" = None) -> str | None:
    """The production version of ``name``, or None if no pointer is set."""
    pointer = read_pointer(name, store)
    return None if pointer is None else pointer.version


def resolve(tag: str, store: "ModelStore | None" = None) -> str:
    """``name:<version>`` for a tag: ``name`` or ``name:production`` -> the production version
    (the latest where no pointer is set); ``name:latest`` -> the latest; ``name:<version>`` (or a
    unique prefix of one, as bentoml allows) -> that version, once checked to exist."""
    store = model_store(store)
    name, _, version = tag.partition(":")
    name = _name(name)
    if version in ("", "production"):
        pointer = read_pointer(name, store)
        if pointer is None:
            version = "latest"
        elif not (Path(store._path) / name / pointer.version).is_dir():
            raise RegistryError(
                f"the production pointer {pointer_path(name, store)} names {name}:"
                f"{pointer.version}, which is no longer in the model store; promote another "
                f"version (`python -m modelstore promote {name}:VERSION`) or roll back")
        else:
            return f"{name}:{pointer.version}"
    return str(_get(store, name, version).tag)


def version_path(tag: str, store: "ModelStore | None" = None) -> Path:
    """The folder of ``name:version`` (a version, a unique prefix of one, or ``latest``; a bare
    ``name`` is its latest), once checked to exist; RegistryError otherwise."""
    name, _, version = tag.partition(":")
    return Path(_get(model_store(store), _name(name), version or "latest").path)


def promote(name: str, version: str, reason: str = "promote",
            store: "ModelStore | None" = None, expect: str | None = None) -> Pointer:
    """Make ``name:version`` production, once it is checked to hold ``REQUIRED_FILES``; the old
    production version goes to the front of the history. Promoting the production version
    changes nothing and returns the pointer as it is. ``expect``: promote only if production is
    still that version (compare-and-swap under the lock; a RegistryError otherwise), so a
    challenger judged against one champion never replaces another."""
    store, name = model_store(store), _name(name)
    version = _servable(store, name, version)
    with _locked(store, name):
        old = read_pointer(name, store)
        if expect is not None and (old.version if old is not None else None) != expect:
            raise RegistryError(
                f"{name}: production is {old.version if old else 'not set'}, not {expect}; "
                f"{name}:{version} was not promoted")
        if old is not None and old.version == version:
            log.info("%s:%s is already production; nothing changed", name, version)
            return old
        history = () if old is None else tuple(
            dict.fromkeys(v for v in (old.version, *old.history) if v != version))
        return _write(store, old, Pointer(name, version, history, _now(), reason))


def rollback(name: str, to: str | None = None, reason: str = "rollback",
             store: "ModelStore | None" = None) -> Pointer:
    """Go back to the previous production version (``history[0]``), or to ``to``. The version
    left is not put into the history, and history entries up to ``to`` are dropped, so rolling
    back again goes further back."""
    store, name = model_store(store), _name(name)
    with _locked(store, name):
        old = read_pointer(name, store)
        if old is None:
            raise RegistryError(f"{name} has no production pointer, so nothing to roll back; "
                                f"set one with `python -m modelstore promote {name}:VERSION`")
        if to is None and not old.history:
            raise RegistryError(
                f"{name}:{old.version} has no earlier production version to roll back to; "
                f"promote one (`python -m modelstore promote {name}:VERSION`) or pass --to")
        target = _servable(store, name, old.history[0] if to is None else to)
        if target == old.version:
            log.info("%s:%s is already production; nothing changed", name, target)
            return old
        rest = old.history[old.history.index(target) + 1:] if target in old.history else old.history
        return _write(store, old, Pointer(name, target, rest, _now(), reason))


def ensure_production(name: str, version: str,
                      store: "ModelStore | None" = None) -> Pointer | None:
    """Make ``name:version`` production if ``name`` has no pointer yet (its first export);
    returns the new pointer, or None if one was already set."""
    store, name = model_store(store), _name(name)
    version = _servable(store, name, version)
    with _locked(store, name):
        if read_pointer(name, store) is not None:
            return None
        return _write(store, None, Pointer(name, version, (), _now(), "first export"))


def list_versions(name: str, store: "ModelStore | None" = None) -> list[VersionInfo]:
    """Every version of ``name``, newest first."""
    from bentoml.exceptions import NotFound

    store, name = model_store(store), _name(name)
    try:
        models = sorted(store.list(name), key=lambda m: m.creation_time, reverse=True)
    except NotFound:
        raise RegistryError(_no_model(store, name)) from None
    current = production(name, store)
    return [VersionInfo(name=name, version=str(m.tag.version),
                        created_at=m.creation_time.isoformat(timespec="seconds"),
                        task=str(m.info.labels.get("task", "")), metrics=_metrics(Path(m.path)),
                        production=str(m.tag.version) == current, path=Path(m.path))
            for m in models]


# ---- internals ---------------------------------------------------------------------------

def _name(name: str) -> str:
    try:
        return _bentoml.tag_name(name)
    except ValueError as exc:
        raise RegistryError(f"{name!r} is not a valid model name: {exc}") from None


def _get(store: "ModelStore", name: str, version: str) -> "Model":
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return store.get(f"{name}:{version}")
    except NotFound:
        if not (Path(store._path) / name).is_dir():
            raise RegistryError(_no_model(store, name)) from None
        raise RegistryError(
            f"{name}:{version} is not in the model store ({store._path}); "
            f"`python -m modelstore list {name}` shows its versions") from None
    except (BentoMLException, ValueError) as exc:  # an ambiguous prefix, a malformed version
        raise RegistryError(f"{name}:{version}: {exc}") from None


def _servable(store: "ModelStore", name: str, version: str) -> str:
    """The full version of ``name:version`` once checked to hold what the service needs."""
    model = _get(store, name, version)
    missing = [f for f in REQUIRED_FILES if not (Path(model.path) / f).is_file()]
    if missing:
        raise RegistryError(f"{model.tag} cannot be production: it lacks {', '.join(missing)} "
                            f"in {model.path}; export it again")
    return str(model.tag.version)


def _no_model(store: "ModelStore", name: str) -> str:
    return (f"no model named {name!r} in the model store ({store._path}; set BENTOML_HOME to "
            f"the folder that holds the project's store, `make` uses ./.bentoml); train and "
            f"export one, or check the name with `bentoml models list`")


def _corrupt(path: Path, why: str) -> str:
    return (f"the production pointer {path} is corrupt ({why}); move it aside and set it again "
            f"with `python -m modelstore promote NAME:VERSION` ({LOG_FILE} beside it "
            f"holds the history)")


@contextmanager
def _locked(store: "ModelStore", name: str) -> Iterator[Path]:
    """Hold the name's writer lock. A temp pointer seen under the lock is a crashed writer's."""
    folder = Path(store._path) / name
    if not folder.is_dir():
        raise RegistryError(_no_model(store, name))
    with open(folder / LOCK_FILE, "a") as lock:  # "a": create if need be, never truncate
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for stale in folder.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        yield folder


def _write(store: "ModelStore", old: Pointer | None, new: Pointer) -> Pointer:
    """Replace the pointer atomically, then append the change to the audit log."""
    path = pointer_path(new.name, store)
    _atomic_write(path, json.dumps(asdict(new), indent=2) + "\n")
    _crash_point("after_replace")
    entry = {"time": new.updated_at, "from": None if old is None else old.version,
             "to": new.version, "reason": new.reason, "user": _user()}
    with open(path.parent / LOG_FILE, "a") as audit:
        audit.write(json.dumps(entry) + "\n")
        audit.flush()
        os.fsync(audit.fileno())
    log.info("%s:%s is production now (was %s; %s)", new.name, new.version, entry["from"],
             new.reason)
    return new


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            _crash_point("after_temp_write")
            f.flush()
            os.fsync(f.fileno())
        _crash_point("before_replace")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _crash_point(step: str) -> None:
    """Die here, as an OOM kill or power cut would, when ``$_CLF_REGISTRY_CRASH_AT == step``
    (steps: after_temp_write, before_replace, after_replace); the atomicity tests use it."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return str(os.getuid())


def _metrics(folder: Path) -> dict:
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}
