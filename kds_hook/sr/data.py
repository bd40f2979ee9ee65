"""The photos the built-in model is trained and evaluated on, and the fixed split between them.

Every photo ships inside an installed package (scikit-image, scikit-learn, matplotlib: ``pip install
'kds-hook[train]'``), so nothing is downloaded. The split was fixed before any training: :data:`TRAIN_PHOTOS` are
the only photos training reads; :data:`HELD_OUT_PHOTOS` are for evaluation only (the model card's metrics and the
real-photo benchmark), and nothing is tuned on them. ``motorcycle_right`` is used nowhere: it is the second view
of the held-out ``motorcycle_left``, nearly the same picture.

The grey-level photos of :data:`TRAIN_PHOTOS` (``gray=True``) are repeated into three channels; training draws
them half as often as the colour ones (:func:`sampling_weight`).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import numpy as np

__all__ = [
    "EXCLUDED_PHOTOS",
    "HELD_OUT_PHOTOS",
    "PHOTOS",
    "TRAIN_PHOTOS",
    "Photo",
    "load_photo",
    "sampling_weight",
]


class Photo(NamedTuple):
    """One photo: where it ships and under which terms."""

    package: str  # the PyPI distribution that ships it
    source: str  # how it is loaded (a function or file of that package)
    gray: bool  # a grey-level photo (repeated into RGB)
    license: str
    credit: str


PHOTOS: Dict[str, Photo] = {
    "astronaut": Photo(
        "scikit-image", "skimage.data.astronaut()", False, "public domain",
        "NASA (Eileen Collins), NASA Great Images database",
    ),
    "rocket": Photo(
        "scikit-image", "skimage.data.rocket()", False, "public domain", "SpaceX, DSCOVR launch on Falcon 9",
    ),
    "hubble_deep_field": Photo(
        "scikit-image", "skimage.data.hubble_deep_field()", False, "public domain", "NASA, Hubble eXtreme Deep Field",
    ),
    "retina": Photo(
        "scikit-image", "skimage.data.retina()", False, "CC0 1.0", "Mikael Häggström, Wikimedia Commons",
    ),
    "immunohistochemistry": Photo(
        "scikit-image", "skimage.data.immunohistochemistry()", False, "no known copyright restrictions",
        "Center for Microscopy And Molecular Imaging (CMMI)",
    ),
    "china": Photo(
        "scikit-learn", "sklearn.datasets.load_sample_image('china.jpg')", False, "CC BY 2.0",
        "danielbuechele (Flickr)",
    ),
    "grace_hopper": Photo(
        "matplotlib", "matplotlib.cbook.get_sample_data('grace_hopper.jpg')", False,
        "public domain (U.S. Navy photograph)", "U.S. Navy, Commodore Grace M. Hopper",
    ),
    "camera": Photo("scikit-image", "skimage.data.camera()", True, "CC0", "Lav Varshney"),
    "brick": Photo("scikit-image", "skimage.data.brick()", True, "CC0", "CC0Textures (Bricks25)"),
    "grass": Photo("scikit-image", "skimage.data.grass()", True, "CC0", "linolafett (DeviantArt)"),
    "gravel": Photo("scikit-image", "skimage.data.gravel()", True, "CC0", "CC0Textures (Gravel04)"),
    # held out
    "chelsea": Photo("scikit-image", "skimage.data.chelsea()", False, "CC0", "Stefan van der Walt"),
    "coffee": Photo(
        "scikit-image", "skimage.data.coffee()", False, "CC0", "Rachel Michetti, courtesy of Pikolo Espresso Bar",
    ),
    "flower": Photo(
        "scikit-learn", "sklearn.datasets.load_sample_image('flower.jpg')", False, "CC BY 2.0", "vultilion (Flickr)",
    ),
    "motorcycle_left": Photo(
        "scikit-image", "skimage.data.stereo_motorcycle()[0]", False,
        "Middlebury 2014 stereo dataset (no license stated; shipped with scikit-image)",
        "D. Scharstein et al., Middlebury College",
    ),
}

TRAIN_PHOTOS: Tuple[str, ...] = (
    "astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "china", "grace_hopper",
    "camera", "brick", "grass", "gravel",
)
HELD_OUT_PHOTOS: Tuple[str, ...] = ("chelsea", "coffee", "flower", "motorcycle_left")
EXCLUDED_PHOTOS: Dict[str, str] = {"motorcycle_right": "the second stereo view of the held-out motorcycle_left"}


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` (a key of :data:`PHOTOS`) as a (H, W, 3) uint8 array, read from the package that ships
    it. Raises ``ValueError`` for an unknown name and ``ImportError`` naming the package when it is missing."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    photo = PHOTOS[name]
    try:
        image = _read(name)
    except ImportError as error:
        raise ImportError(
            f"photo {name!r} ships with {photo.package}, which is not installed: pip install 'kds-hook[train]'"
        ) from error
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _read(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
            return np.asarray(image.convert("RGB"))
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def sampling_weight(name: str) -> float:
    """How often training draws a crop of ``name`` relative to a colour photo: 1, or 0.5 for a grey-level one."""
    return 0.5 if PHOTOS[name].gray else 1.0
