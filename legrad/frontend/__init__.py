"""Front-end helpers shared by the command line, ``playground.py``, ``app.py`` and ``legrad extract``.

Nothing is imported here, so that importing one helper (e.g. :mod:`legrad.frontend.options`) stays light:

* :mod:`~legrad.frontend.explainer` -- :class:`Explainer`: PIL images + prompts -> heatmaps and scores;
* :mod:`~legrad.frontend.models` -- loading OpenCLIP and demo models by name (:func:`load_model`);
* :mod:`~legrad.frontend.classifier_models` -- loading ``timm:``/``torchvision:``/``hf:`` classifiers;
* :mod:`~legrad.frontend.vlm` -- loading a local VLM and explaining candidate answers;
* :mod:`~legrad.frontend.loop` -- the one folder loop (read, explain isolated, write, progress);
* :mod:`~legrad.frontend.downloads` -- failing fast when weights cannot be downloaded;
* :mod:`~legrad.frontend.options` -- parsing user input (image sizes);
* :mod:`~legrad.frontend.scenes` -- the bundled demo scenes;
* :mod:`~legrad.frontend.logs` -- logging set-up for the front ends.

Reading images, files and URLs is the layer below (:mod:`legrad.io`); overlays (:mod:`legrad.viz`), the
demo app (:mod:`legrad.app`) and the command line (:mod:`legrad.cli`) are above and never imported here.
The engine (:mod:`legrad.wrapper` and what it uses) never imports this package.
"""
