"""Serving: the ONNX model repository behind a BentoML service (`bentoml serve serving.service:ImageAI`).

Depends on bentoml, onnxruntime, numpy, Pillow, pydantic and the shared `contract` package only: nothing from
training and none of its dependencies.
"""
