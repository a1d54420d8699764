"""Step 1: the champion, the production version of a name, read from the model store.

``resolve_champion`` reads the production version's artifact (spec, labels, manifest with the
recipe) into a ``Champion``, which every later step takes: it says where the champion lives, how
it preprocesses, what labels it knows and how it was trained.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelstore.layout import LABELS_FILE, MANIFEST_FILE, SPEC_FILE
from preprocessing import ImageSpec, SpecError, TextPreprocessor, TextSpec, load_spec

if TYPE_CHECKING:
    from modelstore import ModelStore

    from ..config import TrainConfig
    from ..text.config import TextTrainConfig


class RetrainError(ValueError):
    """Input the retraining refuses; the message says what to fix. Nothing has been written."""


@dataclass(frozen=True)
class Champion:
    """The production version: where it lives, how it preprocesses, what it knows."""

    name: str
    version: str
    path: Path
    kind: str  # "image" or "text"
    spec: ImageSpec | TextSpec
    labels: tuple[str, ...]
    manifest: dict[str, Any]

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def text_preprocessor(self) -> TextPreprocessor:
        return TextPreprocessor.from_folder(self.path, self.spec)

    def split_seed(self) -> int:
        """The seed of the original data's split: kept through every retraining round, so the
        original test split stays the one the first champion never trained on."""
        return int(self.manifest.get("retrain", {}).get("split_seed",
                                                        self.manifest["train_config"]["seed"]))

    def recipe(self) -> "TrainConfig | TextTrainConfig":
        """The champion's training config, with its original split seed (RetrainError when
        it cannot be rebuilt, e.g. its data folder is gone)."""
        from ..config import DIGITS, TrainConfig
        from ..text.config import DEMO, TextTrainConfig

        source = str(self.manifest["data_source"])
        builtin = DIGITS if self.kind == "image" else DEMO
        if source != builtin and not Path(source).exists():
            raise RetrainError(f"the original data of {self.tag}, {source}, is gone: a "
                               "retraining starts from the champion's own data; restore it")
        config_type = TrainConfig if self.kind == "image" else TextTrainConfig
        fields = {f.name for f in dataclasses.fields(config_type)}
        given = {k: v for k, v in self.manifest["train_config"].items() if k in fields}
        given["seed"] = self.split_seed()
        try:
            return config_type(**given)
        except (TypeError, ValueError) as exc:
            raise RetrainError(f"{self.tag}: its training recipe ({MANIFEST_FILE} train_config) "
                               f"cannot be used: {exc}") from None


def store_at(folder: str | None) -> "ModelStore":
    """``--store``: a BentoML models folder, which must exist; None: the default store."""
    from modelstore import open_store
    from modelstore.registry import model_store

    if folder is None:
        return model_store(None)
    if not Path(folder).is_dir():
        raise RetrainError(f"--store {folder}: no such folder (give a BentoML models folder, "
                           "e.g. $BENTOML_HOME/models)")
    return open_store(folder)


def resolve_champion(name: str, store: "ModelStore") -> Champion:
    """The production version of ``name`` (the latest where no pointer is set)."""
    from modelstore.registry import RegistryError, resolve

    try:
        tag = resolve(name, store)
        model = store.get(tag)
    except RegistryError as exc:
        raise RetrainError(str(exc)) from None
    path = Path(model.path)
    try:
        spec = load_spec((path / SPEC_FILE).read_text())
        labels = tuple(json.loads((path / LABELS_FILE).read_text()))
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError, SpecError) as exc:
        raise RetrainError(f"{tag} cannot be retrained: its artifact in {path} is incomplete or "
                           f"unreadable ({exc})") from None
    if not isinstance(manifest.get("train_config"), dict) or "data_source" not in manifest:
        raise RetrainError(f"{tag} has no training recipe in its {MANIFEST_FILE} (train_config, "
                           "data_source): it was not made by `python -m training`; train one")
    return Champion(model.tag.name, str(model.tag.version), path, spec.kind, spec, labels,
                    manifest)
