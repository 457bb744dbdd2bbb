"""Commands that prepare, build and check models, run by hand before a job, never by one.

- ``prepare_model.py``: writes a user's own ONNX model with the pipeline's input conversion
  (uint8 NHWC RGB in, the model's normalisation and layout inside its graph), for offline builds.

They use ``engines/``; nothing but tests imports them. This file imports nothing.
"""
