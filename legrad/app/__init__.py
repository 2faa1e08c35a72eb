"""The Gradio demo app: ``legrad app`` (or ``python app.py`` in a checkout); needs ``pip install 'legrad_torch[app]'``.

:mod:`legrad.app.page` is the page (the only module that imports gradio, inside its functions),
:mod:`legrad.app.server` the flags and the server; what a request does is
:mod:`legrad.frontend.app_requests`. Importing this package loads neither gradio nor torch.
"""

from __future__ import annotations
