"""The files of one model version in the store, named once (stdlib only).

``training`` writes them, ``modelstore`` checks and reads them, ``service`` serves them and
``monitoring`` compares traffic against them; every one of those uses these names.
"""

from __future__ import annotations

MODEL_FILE = "model.onnx"  # the graph: dynamic batch (and sequence) axis; logits, embedding
SPEC_FILE = "spec.json"  # the preprocessing spec (preprocessing.load_spec)
LABELS_FILE = "labels.json"  # the class names, in logit order
METRICS_FILE = "metrics.json"  # training and test metrics
EXPORT_FILE = "export.json"  # the export's parity figures, opset and exporter
MANIFEST_FILE = "manifest.json"  # seed, data hash, library versions, git commit
REFERENCE_FILE = "reference.npz"  # the reference profile drift reports compare against
CURVES_FILE = "curves.png"  # training curves (a blank image for untrained models)
TOKENIZER_FILE = "tokenizer.json"  # a text model's tokenizer

# What a version needs to be served (and promoted).
REQUIRED_FILES = (MODEL_FILE, SPEC_FILE, LABELS_FILE)
# Everything an image model's export writes.
IMAGE_FILES = (MODEL_FILE, SPEC_FILE, LABELS_FILE, METRICS_FILE, EXPORT_FILE, MANIFEST_FILE,
               REFERENCE_FILE, CURVES_FILE)
# Everything a text model's export writes: the image files plus the tokenizer.
TEXT_FILES = (*IMAGE_FILES, TOKENIZER_FILE)

__all__ = ["MODEL_FILE", "SPEC_FILE", "LABELS_FILE", "METRICS_FILE", "EXPORT_FILE",
           "MANIFEST_FILE", "REFERENCE_FILE", "CURVES_FILE", "TOKENIZER_FILE",
           "REQUIRED_FILES", "IMAGE_FILES", "TEXT_FILES"]
