"""The model store: one exported model is one immutable, versioned entry in BentoML's store.

- ``modelstore.layout``: the files of a version, named once;
- ``modelstore.store``: writing a version (``save_version``);
- ``modelstore.artifact``: reading one for serving (``load_artifact``);
- ``modelstore.registry``: the production pointer, promotion, rollback and history;
- ``modelstore.cli``: their command line, ``python -m modelstore list|show|promote|rollback``;
- ``modelstore._bentoml``: the only module that imports ``bentoml._internal``.

Importing this package imports neither bentoml nor preprocessing's numpy and Pillow.
"""

from typing import TYPE_CHECKING, Any

from ._bentoml import default_store, open_store, store_dir

if TYPE_CHECKING:
    from ._bentoml import ModelStore

__all__ = ["ModelStore", "default_store", "open_store", "store_dir"]


def __getattr__(name: str) -> Any:
    """``ModelStore``, BentoML's model store class, imported on first use (for annotations and
    ``isinstance``; build one with ``open_store``)."""
    if name == "ModelStore":
        from . import _bentoml

        return _bentoml.ModelStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
