"""Reading and writing for the upper layers: the low layer that :mod:`legrad.viz`, :mod:`legrad.frontend`,
:mod:`legrad.eval`, :mod:`legrad.extract`, :mod:`legrad.app` and :mod:`legrad.cli` build on.

* :mod:`~legrad.io.images` -- reading image files and URLs as RGB with bounded work (:func:`load_image`);
* :mod:`~legrad.io.decode_limits` -- what decoding an image will cost (a JPEG's scans, memory), checked first;
* :mod:`~legrad.io.fetch` -- bounded, public-address-only URL fetching;
* :mod:`~legrad.io.files` -- atomic writes, regular-file reads;
* :mod:`~legrad.io.errors` -- the one-line errors front ends print (``ImageLoadError``, ``ModelLoadError``).

It imports nothing from the rest of legrad (only the standard library, numpy and Pillow), and nothing is
imported here, so that importing one module stays light.
"""
