"""Front-end helpers shared by the command line, ``playground.py`` and ``app.py``.

Nothing is imported here, so that importing one helper (e.g. :mod:`legrad.frontend.options`) stays light:

* :mod:`~legrad.frontend.explainer` -- :class:`Explainer`: PIL images + prompts -> heatmaps and scores;
* :mod:`~legrad.frontend.models` -- loading OpenCLIP and demo models by name (:func:`load_model`);
* :mod:`~legrad.frontend.classifier_models` -- loading ``timm:``/``torchvision:``/``hf:`` classifiers;
* :mod:`~legrad.frontend.downloads` -- failing fast when weights cannot be downloaded;
* :mod:`~legrad.frontend.images` -- reading image files and URLs (:func:`load_image`);
* :mod:`~legrad.frontend.fetch` -- bounded, public-address-only URL fetching;
* :mod:`~legrad.frontend.files` -- atomic writes, regular-file reads;
* :mod:`~legrad.frontend.options` -- parsing user input (image sizes);
* :mod:`~legrad.frontend.scenes` -- the bundled demo scenes;
* :mod:`~legrad.frontend.logs` -- logging set-up for the front ends;
* :mod:`~legrad.frontend.errors` -- the one-line errors front ends print.

The engine (:mod:`legrad.wrapper` and what it uses) never imports this package.
"""
