"""The serving layer: a BentoML service running ONNX Runtime with adaptive batching.

Imports no torch and no evidently. ``service.service:Classifier`` is what ``bentoml serve`` runs.
"""
