"""The one place that touches BentoML's internals (``bentoml._internal``).

BentoML 1.4 has no public API for a model store at a given folder, for the process's default
store or its folder, for checking a tag's name, for the server objects ``service/patches.py``
fixes, or for telling a server's worker processes from the process that runs them; everything
else in the project goes through this module, so a BentoML upgrade that moves them breaks here
and only here. Every import is lazy: importing ``modelstore`` does not import bentoml
(``ModelStore`` and ``Model``, BentoML's classes, are imported when first looked up).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bentoml._internal.models.model import Model, ModelStore

__all__ = ["Model", "ModelStore", "open_store", "default_store", "store_dir", "tag_name",
           "prometheus_multiproc_dir_provider", "timeout_middleware_class", "worker_index",
           "arbiter_class", "api_server_socket_name"]


def __getattr__(name: str) -> Any:
    """``ModelStore`` and ``Model``: BentoML's classes, imported on first use."""
    if name in ("ModelStore", "Model"):
        from bentoml._internal.models import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(folder: str | Path) -> "ModelStore":
    """The BentoML model store at ``folder`` (a ``models`` folder: ``<name>/<version>/``)."""
    from bentoml._internal.models.model import ModelStore as _ModelStore

    return _ModelStore(str(folder))


def default_store() -> "ModelStore":
    """The process's default store ($BENTOML_HOME/models), fixed at first use."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.model_store.get()


def store_dir() -> str:
    """The folder of the default store ($BENTOML_HOME/models)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.model_store_dir.get())


def tag_name(name: str) -> str:
    """``name`` as BentoML normalises a tag's name; ValueError if it is not a valid one."""
    from bentoml._internal.tag import Tag

    return Tag(name).name


def prometheus_multiproc_dir_provider() -> Any:
    """BentoML's provider of the Prometheus multiprocess directory (``.set(path)`` it before
    the server starts); ImportError or AttributeError if BentoML changed."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.prometheus_multiproc_dir


def timeout_middleware_class() -> type:
    """BentoML's request-timeout ASGI middleware class; ImportError if BentoML changed."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    return TimeoutMiddleware


def request_metrics_middleware_class() -> type:
    """BentoML's request-metrics ASGI middleware class (``bentoml_service_request_*``);
    ImportError if BentoML changed."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    return RunnerTrafficMetricsMiddleware


def openapi_generator_module() -> Any:
    """The module whose ``generate_spec(svc)`` builds a service's ``/docs.json``
    (``_bentoml_sdk.service.openapi``; BentoML's service looks it up on every call)."""
    from _bentoml_sdk.service import openapi

    return openapi


def service_labels() -> dict[str, str]:
    """The service's labels on BentoML's request metrics (``service_name``,
    ``service_version``, ``runner_name``), as its metrics middleware reads them."""
    from bentoml._internal.context import server_context as ctx

    return {"service_name": ctx.bento_name, "service_version": ctx.bento_version,
            "runner_name": ctx.service_name}


def worker_index() -> int | None:
    """This process's worker number in a BentoML server (1, 2, ...), None outside a worker."""
    from bentoml._internal.context import server_context

    return server_context.worker_index


def arbiter_class() -> type:
    """The circus arbiter class ``bentoml serve`` runs its workers under (the serving parent);
    ImportError if BentoML changed."""
    from bentoml._internal.utils.circus import Arbiter

    return Arbiter


def api_server_socket_name() -> str:
    """The name of the circus socket ``bentoml serve`` creates for the HTTP workers (the arbiter's
    ``sockets[name]``, passed to each worker as ``--fd``); ImportError if BentoML changed."""
    from _bentoml_impl.server.serving import API_SERVER_NAME

    return API_SERVER_NAME


def uses_new_index() -> bool:
    """Whether BentoML serves its newer UI at ``/`` (``main-ui.html`` and its ``assets``) rather
    than Swagger UI's (``static_content``); ImportError if BentoML changed."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return bool(BentoMLContainer.new_index)
