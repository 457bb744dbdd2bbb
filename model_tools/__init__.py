"""Commands that prepare, build and check models, run by hand before a job, never by one.

- ``export_efficientnet.py``: prepares the default model (``make model``), in the venv of its own
  that has torch (``.venv-export``);
- ``build.py``: builds a TensorRT plan and its sidecar on the GPU type it will run on;
- ``validate.py``: checks an engine against the ONNX Runtime fp32 reference on real images;
- ``prepare_model.py``: writes a user's own ONNX model with the pipeline's input conversion
  (uint8 NHWC RGB in, the model's normalisation and layout inside its graph), for offline builds.

They use ``engines/`` and ``images/``; nothing but tests imports them. This file imports nothing,
so the export runs where only torch and the model packages are installed.
"""
