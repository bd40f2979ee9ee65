"""A small pixel-space diffusion pipeline for 4x super-resolution (SR3-style, residual to bicubic).

The diffusion runs on the *scaled residual* ``x = residual_scale * (hr - bicubic_upsample(lr))``: at every step
the UNet sees ``x_t`` concatenated with the bicubic upsampling of the low-resolution input (6 channels in, 3 out)
and predicts ``v`` (``v_prediction``), the parameterisation of diffusers' own 4x upscaler that stays well
conditioned at every noise level and gives usable images in few DDIM steps. The result is
``bicubic_upsample(lr) + x_0 / residual_scale``. Predicting only what bicubic misses spends a small model's
capacity on detail rather than on reproducing the image; the scale brings the residual (std about 0.12 in [-1, 1]
units on the training photos) to the spread of an image (about 0.5), the scale the noise schedule is made for.

Fully convolutional: any input size works. Where the output height or width is not a multiple of the UNet's
downsampling factor, the bicubic image is padded (edge pixels repeated) and the result cropped back.

Any diffusers scheduler of the DDPM family drives it (the shipped one is DDIM, which
:func:`kds_hook.diffusers.apply_patch` steers as it is).
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .resize import SCALE, bicubic_upsample

__all__ = ["KDSSuperResolutionPipeline", "ResidualDecoder", "preprocess"]

ImageInput = Union[PIL.Image.Image, torch.Tensor, np.ndarray, Sequence[PIL.Image.Image]]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def preprocess(image: ImageInput) -> torch.Tensor:
    """A low-resolution input as a float32 tensor (B, 3, h, w) in [-1, 1].

    Accepts a PIL image (converted to RGB), a list of PIL images of one size, a uint8 array (h, w, 3) or
    (B, h, w, 3), or a float tensor (3, h, w) or (B, 3, h, w) already in [-1, 1] (used as it is).
    """
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(entry, PIL.Image.Image) for entry in image):
            raise TypeError("image must be a PIL image, a non-empty list of PIL images, an array or a tensor")
        sizes = {entry.size for entry in image}
        if len(sizes) > 1:
            raise ValueError(f"images of one call must share their size, got {sorted(sizes)}")
        image = np.stack([np.asarray(entry.convert("RGB")) for entry in image])
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"an array image must be uint8 (h, w, 3) or (B, h, w, 3), got {image.dtype}")
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"an array image must be (h, w, 3) or (B, h, w, 3), got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"a tensor image must be (3, h, w) or (B, 3, h, w), got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"a tensor image must be floating point in [-1, 1], got {image.dtype}")
        return image
    raise TypeError(f"image must be a PIL image, a list of PIL images, a uint8 array or a tensor; got {type(image)}")


class ResidualDecoder:
    """The pipeline's decoder: final latents (scaled residuals) plus the bicubic images give the images.

    It plays the part of an autoencoder's ``decode`` (``pipe.decoder.decode``), the one place where the final
    latents become pixels, so :func:`kds_hook.diffusers.run` can select particles there as it does for latent
    pipelines. Not a model: it has no weights and is not saved.
    """

    def __init__(self, residual_scale: float):
        self.residual_scale = float(residual_scale)

    def decode(self, latents: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """Images ``upsampled + latents / residual_scale`` clamped to [-1, 1], float32, from (B, 3, H, W) inputs.

        ``upsampled`` may also hold k rows per latent row, k equal rows each (the k particles of one input share
        their bicubic image): then every k-th row is used, so a selection of particles can be decoded alone.
        """
        rows = latents.shape[0]
        if upsampled.shape[0] != rows:
            if rows == 0 or upsampled.shape[0] % rows:
                raise ValueError(f"cannot pair {rows} latent rows with {upsampled.shape[0]} bicubic images")
            upsampled = upsampled[:: upsampled.shape[0] // rows]
        residual = latents.to(torch.float32) / self.residual_scale
        return (upsampled.to(residual.device, torch.float32) + residual).clamp(-1.0, 1.0)


class KDSSuperResolutionPipeline(DiffusionPipeline):
    """4x super-resolution by pixel-space diffusion on the residual to bicubic upsampling.

    Parameters:
        unet: a :class:`diffusers.UNet2DModel` with 6 input channels (``x_t`` and the bicubic image) and 3 output
            channels.
        scheduler: a diffusers scheduler of the DDPM family (DDIM, DDPM, DPM-Solver, Euler, UniPC, ...).
        residual_scale: the diffusion variable is ``residual_scale * (hr - bicubic)``; saved in
            ``model_index.json``.

    ``pipe.decoder`` (:class:`ResidualDecoder`) turns the final latents into images.
    ``save_pretrained(directory)`` writes the usual diffusers layout; ``from_pretrained(directory)`` on this class
    reads it back (``DiffusionPipeline.from_pretrained`` cannot: the class is not part of diffusers).
    :func:`kds_hook.sr.load_builtin` loads the weights that ship with kds-hook.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: Any, residual_scale: float = 4.0):
        super().__init__()
        residual_scale = float(residual_scale)
        if not np.isfinite(residual_scale) or residual_scale <= 0:
            raise ValueError(f"residual_scale must be a positive finite number, got {residual_scale}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(residual_scale=residual_scale)
        self.decoder = ResidualDecoder(residual_scale)

    @property
    def residual_scale(self) -> float:
        return float(self.config.residual_scale)

    @property
    def size_multiple(self) -> int:
        """Output height and width are padded to a multiple of this for the UNet (its total downsampling)."""
        return 2 ** (len(self.unet.config.down_block_types) - 1)

    def upsample(self, image: ImageInput) -> torch.Tensor:
        """The bicubic 4x upsampling of ``image`` (any form :func:`preprocess` takes), (B, 3, 4h, 4w) float32 on
        the pipeline's device: the model's conditioning and the base of its output."""
        return bicubic_upsample(preprocess(image).to(self.device, torch.float32), SCALE)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 20,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, Tuple[Any]]:
        """Upscales ``image`` 4x.

        Args:
            image: the low-resolution input(s): a PIL image, a list of PIL images of one size, a uint8 array
                (h, w, 3) / (B, h, w, 3), or a float tensor (B, 3, h, w) in [-1, 1].
            num_inference_steps: scheduler steps (default 20).
            eta: DDIM's eta (ignored by schedulers without it).
            generator: a ``torch.Generator`` (or one per row) for the initial noise and any sampler noise.
            latents: initial noise (B, 3, H, W) to use instead of drawing it, H and W the output size padded to a
                multiple of :attr:`size_multiple`; it is multiplied by the scheduler's ``init_noise_sigma``.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float array (B, 4h, 4w, 3) in [0, 1]),
                ``"pt"`` (tensor (B, 3, 4h, 4w) in [0, 1]) or ``"latent"`` (the final scaled residuals, padded).
            return_dict: return an :class:`~diffusers.ImagePipelineOutput` (default) or a tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        upsampled = self.upsample(image)
        height, width = upsampled.shape[-2:]
        multiple = self.size_multiple
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if pad_h or pad_w:
            upsampled = F.pad(upsampled, (0, pad_w, 0, pad_h), mode="replicate")
        dtype = self.unet.dtype
        shape = (upsampled.shape[0], self.unet.config.out_channels, *upsampled.shape[-2:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (the padded output size), got {tuple(latents.shape)}")
        else:
            latents = latents.to(self.device, dtype)
        condition = upsampled.to(dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in step_parameters:
            extra["eta"] = eta
        if "generator" in step_parameters:
            extra["generator"] = generator
        for t in self.progress_bar(self.scheduler.timesteps):
            # only x_t is scaled for the sampler (Euler's 1/sqrt(sigma^2 + 1)); the conditioning stays as trained
            model_input = torch.cat([self.scheduler.scale_model_input(latents, t), condition], dim=1)
            prediction = self.unet(model_input, t).sample
            latents = self.scheduler.step(prediction, t, latents, **extra).prev_sample

        if output_type == "latent":
            images: Any = latents
        else:
            decoded = self.decoder.decode(latents, upsampled)[..., :height, :width]
            images = (decoded + 1.0) / 2.0
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
