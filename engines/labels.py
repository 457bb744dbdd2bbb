"""Class names from text: a ``--labels_file``, or an ONNX model's ``labels`` metadata (read by
:mod:`engines.onnx_summary`, which imports this module; nothing here imports it back)."""

from __future__ import annotations

import json
from typing import List, Optional

from engines.base import EngineError


def parse_labels(text: Optional[str]) -> Optional[List[str]]:
    """Class names from text: a JSON list, else one name per line. None stays None.

    Raises:
        EngineError: text that starts like a JSON list but does not parse.
    """
    if text is None:
        return None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return [str(x) for x in json.loads(stripped)]
        except ValueError as e:
            raise EngineError(f"labels look like a JSON list but do not parse: {e}") from e
    return [line for line in text.splitlines() if line.strip()]

