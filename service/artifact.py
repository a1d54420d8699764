"""Read one exported model from BentoML's model store: the files ``training/export.py`` writes.

A version directory holds ``model.onnx``, ``spec.json``, ``labels.json``, ``metrics.json``,
``export.json``, ``manifest.json`` and ``reference.npz``; a text model also ``tokenizer.json``.
Anything missing, a spec this code cannot honour, or a model of the other kind than the setting
expects stops start-up here with a message that says what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocessing import ImageSpec, SpecError, TextPreprocessor, TextSpec, load_spec

REQUIRED_FILES = ("model.onnx", "spec.json", "labels.json")


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
        return self.path / "model.onnx"

    def read_json(self, filename: str) -> Any:
        file = self.path / filename
        return json.loads(file.read_text()) if file.exists() else None


# Which setting names a model of each kind, for messages.
SETTING_OF = {"image": "CLF_IMAGE_MODEL", "text": "CLF_TEXT_MODEL"}


def load_artifact(tag: str, kind: str = "image") -> Artifact:
    """Resolve ``name[:version]`` in the model store and validate what the service needs for a
    model of ``kind`` (``"image"`` or ``"text"``)."""
    setting = SETTING_OF[kind]
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise ArtifactError(
            f"model {tag!r} is not in the BentoML model store ({_store_path()}); train and export "
            f"one first (`make train` / `python -m training` for images, `python -m training.text` "
            f"for texts), or set {setting} to a tag that `bentoml models list` shows"
        ) from None
    except ValueError as exc:
        raise ArtifactError(f"{setting}={tag!r} is not a valid model tag: {exc}") from None
    path = Path(model.path)
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    if missing:
        raise ArtifactError(f"model {model.tag} is incomplete: missing {missing} in {path}")
    try:
        spec = load_spec((path / "spec.json").read_text())
    except SpecError as exc:
        raise ArtifactError(f"model {model.tag} cannot be served: {exc}") from None
    if spec.kind != kind:
        other = SETTING_OF[spec.kind]
        raise ArtifactError(f"{setting}={tag!r} names {model.tag}, a {spec.kind} model; serve it "
                            f"with {other} instead")
    labels = json.loads((path / "labels.json").read_text())
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ArtifactError(f"model {model.tag}: labels.json must be a non-empty list of strings")
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


def _store_path() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.model_store_dir.get())
