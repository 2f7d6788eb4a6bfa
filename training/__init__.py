"""Offline training: declared task specs → trained, evaluated, ONNX-exported models in models/."""
