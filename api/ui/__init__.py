"""The web UI: Gradio Blocks mounted at ``/ui`` inside the API server (``/`` redirects there).

It is a second front end on the same back end, not a client of it: every request is built by
``api.speech_requests.build_request`` from a ``SpeechRequest`` (so the UI has exactly the API's
validation and limits) and runs through the API's own pipeline (``api.pipeline.run_job``) in the
app's one ``InferenceService`` queue (a UI request waits behind API requests and counts in
``/metrics``); domain errors become the same sentences the API puts in its error envelope, shown
in the page instead of a traceback. Gradio's own queue is not a second gate: inference events
have no Gradio concurrency limit, so the service's bounded queue alone decides (a full queue is
the API's 429 message).

Live playback: a clone (and an edit's last iteration) streams from the engine through the same
pipeline as the API's streamed responses into Gradio's streaming audio output, which plays while
the LLM still generates; the complete result then fills the Output player. A page that leaves
cancels the request, as a gone HTTP client does.

Offline by construction: analytics off before Gradio is imported, the default theme's fonts are
shipped with Gradio, no server-side rendering (no Node), no run history. Gradio serves only its
own upload/cache directories (no ``allowed_paths``). Every request under ``/ui/`` passes
``api.ui.guard.UiGuard`` first: only the routes the page uses, the key's login (throttled) in
front of every route that runs work, files only from Gradio's upload directory, Gradio's errors in
the API's envelope. The events are private (no programmatic Gradio API, no API docs): programs
use the HTTP API.

The modules: ``mount`` (mounting, login, lifespan), ``page`` (the tabs composed), one module per
tab (``clone_tab``, ``edit_tab``, ``voices_tab``, ``cache_tab``, ``log_panel``), ``controls`` (the
run column both run tabs share), ``session`` (what the handlers share: speaking through the
pipeline), ``errors`` (a handler's failure as the page shows it); the guard: ``guard`` (the
middleware), ``routes`` (the page's routes), ``join`` (an event's inputs), ``uploads`` (the files
it may read), ``login`` (the throttle), ``envelope`` (Gradio's answers in the API's envelope).
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by Gradio at import and at launch: never phone home

from api.ui.errors import user_error
from api.ui.mount import UI_PATH, mount_ui
from api.ui.routes import PAGE_ROUTES
from api.ui.uploads import UploadedFiles

__all__ = ["PAGE_ROUTES", "UI_PATH", "UploadedFiles", "mount_ui", "user_error"]
