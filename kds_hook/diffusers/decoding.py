"""Selection where the pipeline decodes, for :func:`~kds_hook.diffusers.run`: one particle per item, one decode.

The autoencoder's ``decode`` is wrapped for the call. When the pipeline hands it the final B·N latents, the
wrapper maps them back to the scheduler's latent space (each family's VAE scaling, shift or per-channel
statistics undone), lets :meth:`KDS.select` pick one particle per item there, and decodes only the chosen B rows
(all B·N with ``return_particles``), exactly as the pipeline prepared them. Everything after the decoder
(clamping, PIL conversion, safety checker, inpainting overlay) is the pipeline's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from ..distributed import selected_particles
from ..kds import KDS

__all__ = ["DecodeCapture", "KDSPipelineOutput"]


@dataclass
class KDSPipelineOutput:
    """What :func:`run` returns, one entry per output item (B = inputs x ``num_images_per_prompt``).

    Attributes:
        images: the selected particle per item, decoded and post-processed as the pipeline's ``output_type`` says
            (a list of PIL images by default; an array or tensor with a leading B; the latents for "latent"; for
            video pipelines the frames, as the pipeline returns them).
        latents: (B, C, *spatial) the selected final latents, in the scheduler's latent space and in spatial layout
            (the decoder's input with the VAE's scaling undone, so it may differ from the scheduler's last output
            in the last bits; Flux's packed latents unpacked to (B, C, h, w)).
        index: (B,) the selected particle's index in 0..N-1.
        particles: (B, N, C, *spatial) all final latents, with ``return_particles=True``; else None.
        particle_images: all N decoded particles per item (a list of B lists of N images, or an array/tensor with
            leading dims (B, N)), with ``return_particles=True``; else None.
        nsfw_content_detected: the pipeline's safety-checker flag of each selected image (B,), or None where the
            pipeline has no safety checker (or reports none).
        particle_nsfw_content_detected: the flags of all particles, B lists of N, with ``return_particles=True``
            and a safety checker; else None.
    """

    images: Any
    latents: torch.Tensor
    index: torch.Tensor
    particles: Optional[torch.Tensor] = None
    particle_images: Any = None
    nsfw_content_detected: Optional[List[bool]] = None
    particle_nsfw_content_detected: Optional[List[List[bool]]] = None


class DecodeCapture:
    """Wraps the autoencoder's decode: selects per item from the B·N final latents and decodes the chosen B.

    ``to_latent_space(z)`` maps the decoder's input back to the scheduler's latent space (spatial layout);
    ``output_to_spatial(x)`` gives the spatial layout of what the pipeline returns with ``output_type="latent"``.
    """

    def __init__(
        self,
        kds: KDS,
        rows: int,
        to_latent_space: Callable[[torch.Tensor], torch.Tensor],
        output_to_spatial: Callable[[torch.Tensor], torch.Tensor],
        decode_all: bool,
    ):
        self.kds, self.rows, self.decode_all = kds, rows, decode_all
        self.to_latent_space, self.output_to_spatial = to_latent_space, output_to_spatial
        self.latents: Optional[torch.Tensor] = None
        self.index: Optional[torch.Tensor] = None
        self.selected: Optional[torch.Tensor] = None

    def _select(self, latents: torch.Tensor) -> torch.Tensor:
        self.latents = latents
        # Over a process group every rank gets the same index and the selected latents themselves.
        selection = self.kds.select(latents)
        self.index, self.selected = selection.index, selection.sample
        return self.index

    def wrap(self, decode: Callable) -> Callable:
        def decode_selected(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if z.shape[0] != self.rows:  # not the final particle batch: leave it alone
                return decode(z, *args, **kwargs)
            index = self._select(self.to_latent_space(z))
            if self.decode_all:
                return decode(z, *args, **kwargs)
            # The chosen rows of the decoder's input (from their owner ranks over a process group).
            return decode(selected_particles(self.kds, z, index), *args, **kwargs)

        return decode_selected

    def result(self, images: Any, nsfw: Optional[List[bool]], items: int, n: int) -> KDSPipelineOutput:
        if self.index is None:  # output_type="latent": nothing was decoded, the images are the latents
            if not isinstance(images, torch.Tensor):
                raise RuntimeError("the pipeline returned images without calling its autoencoder's decode")
            self._select(self.output_to_spatial(images))
            decoded_all = True
        else:
            decoded_all = self.decode_all
        index = self.index
        particle_images = particle_nsfw = None
        if decoded_all:
            if self.decode_all:
                particle_images = _group(images, items, n)
                particle_nsfw = None if nsfw is None else _group(list(nsfw), items, n)
            picks = (torch.arange(items) * n + index.cpu()).tolist()  # rows of this process (no group)
            if isinstance(images, torch.Tensor):  # also over a process group: from the owner ranks
                images = selected_particles(self.kds, images, index)
            else:  # decoded particles: return_particles, which run() refuses over a process group
                images = [images[i] for i in picks] if isinstance(images, list) else images[picks]
            nsfw = None if nsfw is None else [nsfw[i] for i in picks]
        grouped = self.latents.reshape(items, n, *self.latents.shape[1:])
        return KDSPipelineOutput(
            images=images,
            latents=self.selected,
            index=index,
            particles=grouped if self.decode_all else None,
            particle_images=particle_images,
            nsfw_content_detected=None if nsfw is None else list(nsfw),
            particle_nsfw_content_detected=particle_nsfw,
        )


def _group(images: Any, items: int, n: int) -> Any:
    if isinstance(images, list):
        return [images[i * n : (i + 1) * n] for i in range(items)]
    return images.reshape(items, n, *images.shape[1:])
