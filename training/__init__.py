"""Training: datasets over image bytes, the CNN, the training loop, ONNX export to the model store.

Builds on ``preprocessing`` (the same decode/resize/normalise the service runs) and torch.
Submodules are imported explicitly (``from training.export import export_to_store``) so that
importing the package stays cheap.
"""
