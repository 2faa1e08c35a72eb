"""Gradio demo of LeGrad: upload an image, type prompts, see where the model looks for each prompt.

    pip install -e '.[app]'
    python app.py                       # http://127.0.0.1:7860, bundled demo model, works offline
    python app.py --host 0.0.0.0 --port 8080 --device cuda
    legrad app ...                      # the same server from an installed package

The model list holds the demo model and the operator's ``--model`` entries; ``--allow-downloads`` adds
every supported OpenCLIP model, whose weights a visitor's first request downloads (0.6 to 20 GB each; a
model that cannot be loaded shows a message in the page). Loaded models are cached; requests are served by
Gradio's queue (``--concurrency`` at once), each stopped after ``--time-limit`` seconds of work (default 60).
``--model NAME`` (repeatable) adds models to the list, e.g. an image classifier:

    python app.py --model timm:vit_base_patch16_224 --target tabby --target 285

With a classifier selected, the prompts box takes class targets (an index or a class name, one per line).

What a visitor can make the server do is limited (see docs/app.md): by default only uploads and the
bundled examples are explained; ``--allow-dir DIR`` lets the "URL / path" box read images inside DIR,
``--allow-urls`` lets it fetch public http(s) URLs (never loopback/private addresses).

This file is a thin entry point: the page is :mod:`legrad.app.page`, the flags :mod:`legrad.app.server`,
what a request does :class:`legrad.app.requests.DemoApp` (none of which imports gradio at import time).
"""

from __future__ import annotations

import sys

from legrad.app.page import CSS, EXAMPLE_TEXT_CHARS, build_demo, example_rows, upload_folders, upload_path
from legrad.app.requests import (
    DemoApp,
    initial_text,
    model_label,
    parse_model_label,
    split_prompts,
    timeout_message,
)
from legrad.app.server import MAX_UPLOAD_MB, main
from legrad.app.settings import DEFAULT_TIME_LIMIT_S, MAX_PROMPT_CHARS, MAX_PROMPTS, TOY_LABEL, AppSettings
from legrad.app.sources import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MAX_URL_BYTES,
    NO_PATH_MSG,
    NO_SOURCE_MSG,
    NO_URL_MSG,
    UPLOAD_ONLY_MSG,
    URL_DEADLINE_S,
    URL_FAILED_MSG,
    checked_upload,
    shared_folder,
)

#: The app this script's functions answer with (default settings: CPU, uploads only). ``main`` serves a
#: new :class:`DemoApp` built from the command line's flags instead.
APP = DemoApp()
SETTINGS = APP.settings
predict = APP.predict
get_explainer = APP.get_explainer
forget_model = APP.forget_model
model_labels = APP.model_labels
is_classifier_label = APP.is_classifier_label
prompts_box_for = APP.prompts_box_for
default_layer_for = APP.default_layer_for
allowed_path = APP.allowed_path
read_visitor_image = APP.read_visitor_image

__all__ = [
    "APP", "AppSettings", "CSS", "DEFAULT_TIME_LIMIT_S", "DemoApp", "EXAMPLE_TEXT_CHARS", "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS", "MAX_PROMPT_CHARS", "MAX_PROMPTS", "MAX_UPLOAD_MB", "MAX_URL_BYTES", "NO_PATH_MSG",
    "NO_SOURCE_MSG", "NO_URL_MSG", "SETTINGS", "TOY_LABEL", "UPLOAD_ONLY_MSG", "URL_DEADLINE_S", "URL_FAILED_MSG",
    "allowed_path", "build_demo", "checked_upload", "default_layer_for", "example_rows", "forget_model",
    "get_explainer", "initial_text", "is_classifier_label", "main", "model_label", "model_labels",
    "parse_model_label", "predict", "prompts_box_for", "read_visitor_image", "shared_folder", "split_prompts",
    "timeout_message", "upload_folders", "upload_path",
]

if __name__ == "__main__":
    sys.exit(main())
