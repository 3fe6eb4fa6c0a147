"""Layer specs and modules, one module per section family; importing this package
fills the section-name registry (:data:`REGISTRY`)."""
from . import conv, heads, merge, misc, pooling  # noqa: F401  (registers the section types)
from .base import (PROFILES, REGISTRY, BuildContext, LayerModule, LayerSpec, NetSpec,
                   spec_for_section)
from .heads import GaussianYoloSpec, HeadSpec, RegionSpec, YoloSpec

__all__ = ["PROFILES", "REGISTRY", "BuildContext", "LayerModule", "LayerSpec", "NetSpec",
           "spec_for_section", "HeadSpec", "YoloSpec", "GaussianYoloSpec", "RegionSpec"]
