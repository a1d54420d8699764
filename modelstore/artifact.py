"""Read one exported model from BentoML's model store: the files ``modelstore.layout`` names.

A version directory holds ``IMAGE_FILES`` (``model.onnx``, ``spec.json``, ``labels.json``,
``metrics.json``, ``export.json``, ``manifest.json``, ``reference.npz``, ``curves.png``); a text
model also ``tokenizer.json`` (``TEXT_FILES``). Anything missing, a spec this code cannot honour,
or a model of the other kind than the setting expects stops start-up here with a message that
says what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocessing import ImageSpec, SpecError, TextPreprocessor, TextSpec, load_spec

from . import _bentoml
from .layout import LABELS_FILE, MODEL_FILE, REQUIRED_FILES, SPEC_FILE

__all__ = ["Artifact", "ArtifactError", "REQUIRED_FILES", "SETTING_OF", "load_artifact",
           "text_preprocessor"]


class ArtifactError(RuntimeError):
    """The model named in the settings cannot be served."""


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    path: Path
    spec: ImageSpec | TextSpec
    labels: tuple[str, ...]
    metadata: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    def read_json(self, filename: str) -> Any:
        file = self.path / filename
        return json.loads(file.read_text()) if file.exists() else None


# Which setting of the service names a model of each kind, for messages.
SETTING_OF = {"image": "CLF_IMAGE_MODEL", "text": "CLF_TEXT_MODEL"}


def load_artifact(tag: str, kind: str = "image", setting: str | None = None) -> Artifact:
    """Resolve ``name[:version]`` in the model store and validate what the service needs for a
    model of ``kind`` (``"image"`` or ``"text"``). ``setting``: the name of the setting that
    gave ``tag``, for messages (default: the service's ``SETTING_OF[kind]``)."""
    setting = SETTING_OF[kind] if setting is None else setting
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise ArtifactError(
            f"model {tag!r} is not in the BentoML model store ({_bentoml.store_dir()}; set "
            f"BENTOML_HOME to the folder that holds the project's store, `make` uses ./.bentoml); "
            f"train and export one first (`make train` / `python -m training` for images, "
            f"`python -m training.text` for texts), or set {setting} to a tag that "
            f"`bentoml models list` shows"
        ) from None
    except ValueError as exc:
        raise ArtifactError(f"{setting}={tag!r} is not a valid model tag: {exc}") from None
    path = Path(model.path)
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    if missing:
        raise ArtifactError(f"model {model.tag} is incomplete: missing {missing} in {path}")
    try:
        spec = load_spec((path / SPEC_FILE).read_text())
    except SpecError as exc:
        raise ArtifactError(f"model {model.tag} cannot be served: {exc}") from None
    if spec.kind != kind:
        other = SETTING_OF[spec.kind]
        raise ArtifactError(f"{setting}={tag!r} names {model.tag}, a {spec.kind} model; serve it "
                            f"with {other} instead")
    labels = json.loads((path / LABELS_FILE).read_text())
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ArtifactError(f"model {model.tag}: {LABELS_FILE} must be a non-empty list of strings")
    return Artifact(
        name=model.tag.name,
        version=str(model.tag.version),
        path=path,
        spec=spec,
        labels=tuple(labels),
        metadata=dict(model.info.metadata),
    )


def text_preprocessor(artifact: Artifact) -> TextPreprocessor:
    """The text artifact's preprocessing: its spec plus the tokenizer file the spec names."""
    if not isinstance(artifact.spec, TextSpec):
        raise ArtifactError(f"model {artifact.name}:{artifact.version} is not a text model")
    try:
        return TextPreprocessor.from_folder(artifact.path, artifact.spec)
    except SpecError as exc:
        raise ArtifactError(
            f"model {artifact.name}:{artifact.version} cannot be served: {exc}") from None
