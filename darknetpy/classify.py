"""Classification as ``./darknet classifier predict`` does it (``classifier.c:
predict_classifier``).

image -> letterbox (pjreddie) or resize (AlexeyAB) to the network size ->
forward -> the last layer's output as class probabilities -> with a WordNet
tree, ``hierarchy_predictions`` (pjreddie: leaves only; AlexeyAB: all nodes)
-> ``top_k`` -> lines ``%5.2f%%: name``.
"""
from __future__ import annotations

import torch

from .image import load_image, prepare_input


def classifier_tree(model):
    """The tree of the network's ``[softmax] tree=`` layer, if any (Darknet's ``net->hierarchy``)."""
    for spec in model.specs:
        tree = getattr(spec, "tree", None)
        if spec.type in ("softmax", "soft") and tree is not None:
            return tree
    return None


def top_k(values: list[float], k: int) -> list[int]:
    """Darknet's ``utils.c: top_k``: indices of the k largest values; on ties the
    lower index wins (strict ``>``). NaNs are left out (Darknet's insertion loop can
    place a NaN found before k other values)."""
    order = sorted((i for i, v in enumerate(values) if v == v), key=lambda i: -values[i])
    return order[:k]


def predictions(model, images: list[torch.Tensor], letterbox: bool | None = None) -> torch.Tensor:
    """Class probabilities (N, classes) for decoded images (each (3, H, W) RGB 0..1).

    ``letterbox`` defaults to the profile's ``classifier predict`` (pjreddie
    letterboxes, AlexeyAB resizes).
    """
    from .tree import hierarchy_predictions
    net = model.net
    if letterbox is None:
        letterbox = model.profile == "pjreddie"
    x = torch.stack([prepare_input(im, net.width, net.height, letterbox) for im in images])
    with torch.inference_mode():
        out = model(x.to(model.device))
    if isinstance(out, tuple):
        out = out[-1]
    probs = out.float().cpu().reshape(out.shape[0], -1)  # (N, C, H, W) -> (N, classes)
    tree = classifier_tree(model)
    if tree is not None:
        probs = hierarchy_predictions(probs, tree, only_leaves=model.profile == "pjreddie")
    return probs


def classify(model, image, top: int = 5, names: list[str] | None = None,
             letterbox: bool | None = None) -> list[tuple[int, str, float]]:
    """Top-``top`` classes of one image: ``[(class_id, name, prob 0..1), ...]``, best first.

    ``image``: a path, PIL image or uint8 HWC array.

    Raises:
        ImageError: the image cannot be read.
    """
    return top_rows(predictions(model, [load_image(image)], letterbox)[0].tolist(), top,
                    names or [])


def top_rows(values: list[float], top: int, names: list[str]) -> list[tuple[int, str, float]]:
    """``[(class_id, name, prob)]`` of the ``top`` best classes (Darknet's ``top_k``)."""
    from .detect import class_name
    return [(i, class_name(names, i), values[i]) for i in top_k(values, top)]


def format_top(rows: list[tuple[int, str, float]]) -> list[str]:
    """Darknet's lines: ``%5.2f%%: name`` of the float32 probability times 100."""
    return [f"{float(torch.tensor(p, dtype=torch.float32) * 100):5.2f}%: {name}"
            for _, name, p in rows]
