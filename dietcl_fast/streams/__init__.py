"""Data streams for DietCL: indexed sources and class-/time-incremental scenarios.

Pure data (numpy + PIL); never imports torch. See ``sources`` and ``scenarios`` docstrings.
"""
from .sources import (
    ANIMAL_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    SOURCES,
    Source,
    StreamError,
    load_csv,
    load_image_folder,
    load_source,
    register_source,
)
from .scenarios import DRIFT_SIGMA, SCENARIOS, Stream, TimeStep, build_stream, synthetic_timestamps

__all__ = [
    "ANIMAL_MNIST_CLASSES", "IMAGE_EXTENSIONS", "SOURCES", "Source", "StreamError", "load_csv",
    "load_image_folder", "load_source", "register_source", "DRIFT_SIGMA", "SCENARIOS", "Stream",
    "TimeStep", "build_stream", "synthetic_timestamps",
]
