"""``gcp-storage-emulator`` with GCS's write preconditions, for the tests' GCS server.

The emulator (checked: 2026.7.19) ignores ``ifGenerationMatch``, which the commit relies on to
replace ``_SUCCESS`` only over the version a run started from. GCS documents it
(https://cloud.google.com/storage/docs/request-preconditions): an upload with
``ifGenerationMatch=N`` succeeds only if the object's live generation is N, and ``0`` means "only
if no live object exists"; otherwise the request fails with ``412 Precondition Failed``. This
module adds exactly that to the emulator's simple and multipart uploads (what
``google-cloud-storage`` uses for small objects such as ``_SUCCESS``), under one lock so that
check and write are one step, then starts the emulator as ``python -m gcp_storage_emulator``
would::

    python -m tests.gcs_emulator start --host 127.0.0.1 --port 9023 --in-memory --default-bucket b
"""

from __future__ import annotations

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()
_insert = objects.insert


def _object_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or {}).get("name") or data.get("name")
    return None


def insert_with_preconditions(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    kind = (request.query.get("uploadType") or [""])[0]
    if not wanted or kind not in ("media", "multipart"):
        return _insert(request, response, storage, *args, **kwargs)
    with _LOCK:
        try:
            live = str(storage.get_file_obj(request.params["bucket_name"], _object_name(request))["generation"])
        except NotFound:
            live = "0"
        if live != wanted[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            message = f"At least one of the pre-conditions you specified did not hold (live generation {live})."
            response.json({"error": {"code": 412, "message": message,
                                     "errors": [{"message": message, "reason": "conditionNotMet"}]}})
            return None
        return _insert(request, response, storage, *args, **kwargs)


objects.insert = insert_with_preconditions  # before the server module builds its routing table

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[1:])
