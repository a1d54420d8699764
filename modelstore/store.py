"""Writing a version: checked files from a staging folder become a new, immutable version.

``training`` stages and checks every file of the artifact (``modelstore.layout``) in a
temporary folder first, then calls ``save_version``, so a failed export leaves the store
untouched. The first version of a name becomes production (``registry.ensure_production``);
later ones wait for ``python -m modelstore promote``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .registry import ensure_production

if TYPE_CHECKING:  # bentoml is imported where used
    import bentoml

    from ._bentoml import ModelStore

log = logging.getLogger(__name__)

__all__ = ["save_version", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex): what an imported model records of its source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_version(staged: Path, name: str, *, files: Sequence[str], task: str,
                 metadata: dict[str, Any], store: "ModelStore | None" = None,
                 logger: logging.Logger | None = None) -> "bentoml.Tag":
    """Copy checked ``files`` from ``staged`` into a new version of ``name`` in the model store
    (``store``, or the default ``$BENTOML_HOME/models``), labelled with ``task``
    (``image-classification`` or ``text-classification``) and ``metadata`` (None values are
    dropped: bentoml refuses them); the first version of a name is made production, which is
    logged on ``logger`` (default: this module's; training passes its own)."""
    import bentoml

    metadata = {k: v for k, v in metadata.items() if v is not None}  # bentoml refuses None
    # ``_model_store`` is create()'s injection point (bentoml's own tests use it); without
    # it the store is the process-wide $BENTOML_HOME one, fixed at first use.
    extra = {} if store is None else {"_model_store": store}
    with bentoml.models.create(name, labels={"task": task}, metadata=metadata,
                               **extra) as bento_model:
        for filename in files:
            shutil.copyfile(Path(staged) / filename, Path(bento_model.path) / filename)
    # The first export of a name becomes production; later ones wait for `modelstore promote`.
    if ensure_production(name, str(bento_model.tag.version), store=store) is not None:
        (logger or log).info("%s is the first version of %s: it is production now", bento_model.tag, name)
    return bento_model.tag
