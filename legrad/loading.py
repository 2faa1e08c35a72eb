"""Alias of :mod:`legrad.frontend.models` (and the image, option, scene and logging helpers that lived
here), kept for compatibility; new code imports from :mod:`legrad.frontend`."""

from .frontend.errors import ImageLoadError, ImageTooLargeError, ModelLoadError
from .frontend.images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, load_image
from .frontend.logs import configure_logging
from .frontend.models import (
    TOY_NAME,
    default_layer_index,
    default_pretrained,
    load_model,
    model_choices,
    native_image_size,
    resolve_device,
)
from .frontend.options import parse_size
from .frontend.scenes import SampleScene, absent_phrase, sample_scenes

__all__ = ["TOY_NAME", "IMAGE_EXTENSIONS", "ModelLoadError", "ImageLoadError", "ImageTooLargeError",
           "MAX_IMAGE_PIXELS", "load_model", "resolve_device", "default_layer_index", "default_pretrained",
           "native_image_size", "load_image", "parse_size", "model_choices", "configure_logging", "SampleScene",
           "sample_scenes", "absent_phrase"]
