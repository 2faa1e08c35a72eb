"""The Gradio demo app: ``legrad app`` (or ``python app.py`` in a checkout); needs ``pip install 'legrad_torch[app]'``.

:mod:`legrad.app.page` is the page (the only module that imports gradio, inside its functions),
:mod:`legrad.app.server` the flags and the server, :mod:`legrad.app.settings` the limits and the operator's
:class:`~legrad.app.settings.AppSettings`; what a request does is :class:`legrad.app.requests.DemoApp`
(one per server: the settings and the loaded models), where an image may come from :mod:`legrad.app.sources`,
a local VLM's request :mod:`legrad.app.vlm`. Importing this package loads neither gradio nor torch.
"""

from __future__ import annotations
