"""darknetpy: Darknet's inference path, faithfully, in Python and PyTorch.

>>> import darknetpy                                           # doctest: +SKIP
>>> model = darknetpy.load("cfg/yolov3.cfg", "yolov3.weights")  # doctest: +SKIP
"""
from .cfg import Section, parse_cfg, read_cfg, sections_to_text
from .errors import CfgError, DarknetError, DeviceError, ImageError, WeightsError
from .model import Architecture, Darknet, InputError, load, parse_architecture

__version__ = "0.1.0"

__all__ = ["load", "Darknet", "Architecture", "parse_architecture", "parse_cfg", "read_cfg",
           "sections_to_text", "Section", "DarknetError", "CfgError", "WeightsError",
           "ImageError", "DeviceError", "InputError", "__version__"]
