"""Input images: reading and checking them, splitting them into what the model sees (RGB) and what the result
needs to get the input's form back (grayscale, alpha, colour profile), and the pixel conversions around the model
(padding to the model's multiple, tensors to PIL). PIL and numpy are imported inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

from .errors import CommandError, first_line
from .progress import count

# What a directory given as input contributes: its files with these extensions (in any case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga", ".ppm", ".pgm",
                    ".pbm", ".pnm")

# PIL modes whose values mean the same after conversion to RGB or L, so the input's colour profile still applies.
_PROFILE_KEEPING_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "I", "F")


class Input(NamedTuple):
    """An input image split for the model: RGB pixels, plus what is needed to give the result the input's form."""

    rgb: Any  # PIL image, mode RGB: what the model sees
    alpha: Any  # PIL image, mode L, or None: the input's alpha channel
    gray: bool  # the input is grayscale: the result is written as L (LA with alpha)
    icc_profile: Optional[bytes]  # the input's colour profile, where it still describes the converted pixels

    @property
    def output_mode(self) -> str:
        return ("L" if self.gray else "RGB") + ("A" if self.alpha is not None else "")


def expand_inputs(paths: Sequence[Path], report: Callable[[str], None]) -> Tuple[List[Path], bool]:
    """The input files for ``paths``: a file as it is; a directory's images, sorted by name, neither hidden ones
    nor those in subdirectories. Also whether any path was a directory. ``report`` gets one line per directory
    saying how many images it held; a directory without any is an error."""
    sources, any_directory = [], False
    for path in paths:
        if not path.is_dir():
            sources.append(path)  # read_input reports a missing or unreadable file
            continue
        any_directory = True
        try:
            found = sorted(entry for entry in path.iterdir() if entry.suffix.lower() in IMAGE_EXTENSIONS
                           and not entry.name.startswith(".") and entry.is_file())
        except OSError as error:
            raise CommandError(f"cannot list input directory {path}: {error.strerror or error}") from None
        if not found:
            raise CommandError(f"input directory {path} holds no images (no files ending in "
                               f"{', '.join(IMAGE_EXTENSIONS)}; subdirectories are not searched)")
        report(f"kds-hook: found {count(len(found), 'image')} in {path}")
        sources += found
    return sources, any_directory


def _open_image(path: Path, role: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise CommandError(f"{role} {path} does not exist")
    if not path.is_file():
        raise CommandError(f"{role} {path} is not a file")
    try:
        with Image.open(path) as opened:
            opened.load()
            # Camera photos: work on the pixels as viewers show them.
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some
        raise CommandError(f"{role} {path} is not a readable image ({first_line(error)})") from None
    except Image.DecompressionBombError as error:
        raise CommandError(f"{role} {path}: {error}") from None
    return image


def read_input(path: Path, role: str) -> Input:
    """The image at ``path`` as an :class:`Input`; ``role`` ("input", "image") names it in error messages."""
    image = _open_image(path, role)
    try:
        base = _eight_bit(image)
        gray = base.mode in ("1", "L", "LA", "La")
        rgb = base.convert("RGB")
        alpha = image.convert("RGBA").getchannel("A") if has_alpha(image) else None
    except (ValueError, OSError) as error:
        raise CommandError(f"{role} {path}: cannot convert its {image.mode} pixels to RGB ({error})") from None
    keeps_profile = image.mode in _PROFILE_KEEPING_MODES or image.mode.startswith("I;16")
    return Input(rgb, alpha, gray, image.info.get("icc_profile") or None if keeps_profile else None)


def read_mask(path: Path):
    """The mask at ``path`` as an 8-bit grayscale PIL image."""
    image = _open_image(path, "mask")
    try:
        return _eight_bit(image).convert("L")
    except (ValueError, OSError) as error:
        raise CommandError(f"mask {path}: cannot convert its {image.mode} pixels to grayscale ({error})") from None


def _eight_bit(image):
    """``image`` with 16- and 32-bit grayscale mapped to 8-bit L; other modes as they are. PIL's own conversion
    clips those values at 255 (a 16-bit PNG would turn white) instead of scaling them."""
    import numpy as np
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)  # integer levels 0..65535 (16-bit PNG and TIFF)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return image.convert("L")  # PIL's convention for float images: levels 0..255
    return image


def has_alpha(image) -> bool:
    """Whether a PIL image carries transparency (an alpha channel or a transparent palette entry)."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def tensor_to_pil(image):
    """A (3, H, W) tensor in [0, 1] as an RGB PIL image, rounded exactly as diffusers' ``numpy_to_pil``."""
    from PIL import Image

    array = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255).round().astype("uint8"))


def join_channels(rgb, item: Input):
    """The model's RGB result in the input's form: grayscale again where the input was, with its alpha."""
    out = rgb.convert("L") if item.gray else rgb
    if item.alpha is not None:
        from PIL import Image

        alpha = item.alpha
        # Alpha is not something the model restores: a plain Lanczos resize is the faithful upscale of it.
        out.putalpha(alpha if alpha.size == out.size else alpha.resize(out.size, Image.LANCZOS))
    return out


def pad_to_multiple(array, multiple: int):
    """Pads an (H, W, C) array at the bottom and right to multiples of ``multiple`` by mirroring, not zeros, so
    the model sees plausible content at the borders of what is kept."""
    import numpy as np

    height, width = array.shape[:2]
    return np.pad(array, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")
