"""Image code with no Beam in it: read a file by the reading rules, pre-screen its header, decode it.

- ``reading.py``: read one image file (regular files only, a time limit, in-flight tracking) and
  pre-screen or decode it into pixels or a dead-letter reason;
- ``prescreen.py``: a header-only check that routes each image to the GPU decoder or to Pillow;
- ``pillow_decoder.py``: the CPU decoder and the resize-and-crop every path reproduces;
- ``dali_decoder.py``: the GPU decoder (NVIDIA DALI), imported lazily;
- ``scoring.py``: an engine plus a pool of GPU decoders, scoring whole batches.

It uses ``engines/`` through its interface (``engines.base``), the device helpers and the file API
(``engines.storage``); ``transforms/`` wraps it in Beam.
"""
