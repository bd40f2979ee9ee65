"""Particles for a diffusers pipeline: expand each input to N particles, steer, select in latent space, decode once.

:func:`run` wraps one pipeline call. It repeats every input N times (contiguous, so the particles of one input
form one group for :class:`~kds_hook.KDS`; :mod:`.inputs`), patches the scheduler for the call
(:func:`apply_patch`, with the latent layout of packed-latent families), picks one particle per input from the
final latents (Eq. 9, :meth:`KDS.select`) where the pipeline hands them to its VAE, and decodes only the chosen
latent (:mod:`.decoding`). The pipeline's own post-processing (clamping, denormalising, PIL conversion, safety
checker, inpainting overlay) then runs unchanged on the decoded images. What differs between pipelines is in
:mod:`.families`; ``max_batch_size`` is in :mod:`.chunking`.

Duck-typed: diffusers is imported only inside :func:`run` where a family needs it (LDM-SR's pre-processing).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Dict, Iterator, Optional

from ..kds import KDS
from .chunking import chunked
from .decoding import DecodeCapture, KDSPipelineOutput
from .families import FAMILIES, family_of
from .patch import apply_patch, patched_kds, patched_layout, remove_patch

__all__ = ["KDSPipelineOutput", "SUPPORTED_PIPELINES", "run"]

# Pipeline class (or a base class of it) -> the attribute holding its autoencoder.
SUPPORTED_PIPELINES: Dict[str, str] = {name: family.autoencoder for name, family in FAMILIES.items()}


def run(
    pipe: Any,
    kds: KDS,
    *,
    max_batch_size: Optional[int] = None,
    return_particles: bool = False,
    **call_kwargs: Any,
) -> KDSPipelineOutput:
    """Calls ``pipe(**call_kwargs)`` with ``kds.num_particles`` KDS-steered particles per input; returns one image each.

    Supported (subclasses count as their base):

    - LDMSuperResolutionPipeline: ``image`` is a PIL image, a list of PIL images of one size, or a tensor
      (B, 3, h, w) in [-1, 1].
    - StableDiffusionPipeline / StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline and
      StableDiffusionUpscalePipeline (the x4 upscaler): ``prompt`` or ``prompt_embeds``,
      ``negative_prompt(_embeds)``, ``image``, ``mask_image``, ``masked_image_latents``.
    - StableDiffusionXLPipeline / ...Img2ImgPipeline / ...InpaintPipeline: as Stable Diffusion, plus
      ``prompt_2``, ``negative_prompt_2``, ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``.
    - StableDiffusion3Pipeline: as SDXL, plus ``prompt_3``, ``negative_prompt_3``.
    - FluxPipeline / FluxImg2ImgPipeline / FluxFillPipeline: as SDXL (negative prompts with ``true_cfg_scale``;
      Fill has none); the scheduler is steered through the packed-latent layout of the call's height and width.
    - WanPipeline (video, ``num_videos_per_prompt``): ``prompt(_embeds)``, ``negative_prompt(_embeds)``.

    Each per-input argument holds 1 or B entries, a single one serving every input (a single negative prompt
    string also serves a list of prompts). Inpainting with ``padding_mask_crop`` takes one PIL image and one PIL
    mask (as in diffusers), which then serve every row. IP-adapter inputs are refused.

    Particles: each input is repeated N times, contiguously, and the pipeline runs on the B*N batch. Initial
    noise comes from ``generator`` exactly as in the pipeline: one ``torch.Generator`` draws the whole (B*N, ...)
    noise, so ``run(pipe, KDS(strength=0.0, ...), generator=torch.Generator().manual_seed(s), ...)`` gives the
    plain pipeline's particles on that batch, bit for bit, from the same noise as the KDS run with the same seed
    (a paired comparison). A list of generators may hold one per input (each input's particles then draw from
    its own generator, in turn) or one per particle. ``latents``, when given, must already hold B*N rows. Every
    other random draw the pipeline makes per row is also made per particle: the x4 upscaler noises each
    particle's copy of the low-resolution image with its own draw at ``noise_level``, exactly as the plain
    pipeline does for every row of that batch.

    ``num_images_per_prompt=M`` (``num_videos_per_prompt`` for video) gives M independent outputs per input, each
    from its own ensemble of N particles (M*N pipeline rows per input).

    Selection: where the pipeline decodes its final (B*N) latents, :meth:`KDS.select` picks one particle per item
    in the scheduler's latent space (the family's VAE scaling, shift or statistics undone, packed latents
    unpacked) and only those B latents are decoded. ``return_particles=True`` decodes all B*N instead and returns
    them too.

    Independence: inputs never mix; each input's particles are steered and selected among themselves. The
    numbers of one input can still change in the last bits when other inputs share its batch, because math
    libraries choose kernels and summation orders by batch size: runs with a different batch layout agree to
    float rounding, not bit for bit.

    Memory: ``max_batch_size`` runs the denoiser over the batch in chunks of at most that many rows (with
    classifier-free guidance the UNet batch is 2*B*N). Every tensor argument whose first dim is the batch is
    split; others pass through. Steering still sees the whole batch, and the result equals the unchunked one to
    float rounding (a chunk is a different batch size for the kernels). The autoencoder is not chunked: use
    ``pipe.vae.enable_slicing()`` to encode the B*N repeated images of img2img/inpaint, or to decode all
    particles with ``return_particles``, one at a time.

    Over a process group (``KDS(process_group=...)``, docs/distributed.md): every rank calls ``run`` with the same
    inputs; each runs its own share of every item's particles (``kds.local_particles`` rows per item), which needs
    ``generator=kds_hook.distributed.particle_generators(seed, items, kds)`` (one generator per row of the rank:
    the same particles whatever the world size), and ``latents``, when given, holds the rank's rows only.
    Selection is :meth:`KDS.select` over the group; the chosen latents are delivered to every rank, and every
    rank decodes them: every rank returns the same output. ``return_particles`` is refused there.

    The scheduler is patched for the call only: afterwards the pipeline is exactly as before (also on error). If
    the scheduler already carried a KDS patch, ``kds`` replaces it for the call and the earlier patch is
    re-applied afterwards.

    Raises:
        TypeError: ``kds`` is not a KDS; ``return_dict`` was given (run always returns a KDSPipelineOutput).
        ValueError: unsupported pipeline, or one missing its denoiser or autoencoder; unsupported scheduler or
            prediction type (from :func:`apply_patch`); inputs, generators or latents whose counts do not match.
    """
    if not isinstance(kds, KDS):
        raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, numbers.Integral) or max_batch_size < 1
    ):
        raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
    if "return_dict" in call_kwargs:
        raise TypeError("run() always returns a KDSPipelineOutput; do not pass return_dict")
    _, family = family_of(pipe)
    for component in (family.denoisers[0], family.autoencoder, "scheduler"):
        if getattr(pipe, component, None) is None:
            raise ValueError(
                f"{type(pipe).__name__} has no {component} (None): load the pipeline with all its components and "
                "their weights (from_pretrained on a complete model directory or Hub id)"
            )
    n = kds.local_particles  # N, or this rank's share of the N particles over a process group
    if kds.world_size > 1:
        _check_spread_call(kds, call_kwargs, return_particles)
    kwargs, items = family.expand(call_kwargs, n)
    if kds.world_size > 1 and len(call_kwargs["generator"]) != items * n:
        raise ValueError(
            f"over a process group, generator must hold one generator per row of this rank ({items} item(s) x "
            f"{n} particles = {items * n}), e.g. kds_hook.distributed.particle_generators(seed, {items}, kds)"
        )
    layout = None if family.layout is None else family.layout(pipe, kwargs)

    capture = DecodeCapture(
        kds,
        items * n,
        to_latent_space=lambda z: family.to_latent_space(pipe, z),
        output_to_spatial=(lambda x: x) if layout is None else layout.to_spatial,
        decode_all=return_particles,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(_kds_patch(pipe, kds, layout))
        stack.enter_context(_override(getattr(pipe, family.autoencoder), "decode", capture.wrap))
        if max_batch_size is not None:
            for name in family.denoisers:
                denoiser = getattr(pipe, name, None)
                if denoiser is not None:
                    make = lambda f: chunked(f, max_batch_size, family.not_per_row)  # noqa: E731
                    stack.enter_context(_override(denoiser, "forward", make))
        output = pipe(**kwargs, return_dict=True)
    return capture.result(getattr(output, family.output), getattr(output, "nsfw_content_detected", None), items, n)


def _check_spread_call(kds: KDS, call_kwargs: Dict[str, Any], return_particles: bool) -> None:
    """Over a process group each rank runs its own share of rows: its noise must be its particles' own."""
    if return_particles:
        raise ValueError(
            "return_particles=True over a process group: each rank holds only its own particles; use "
            "output_type='latent' and gather them, or run in one process"
        )
    if not isinstance(call_kwargs.get("generator"), (list, tuple)):
        raise ValueError(
            "over a process group, pass generator=kds_hook.distributed.particle_generators(seed, items, kds): one "
            "generator per particle, so that every rank draws its own particles' noise (one generator, or the "
            "global RNG, would give every rank the same noise)"
        )


# ------------------------------------------------------------------------------- temporary overrides of methods


@contextlib.contextmanager
def _override(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Sets ``obj.name = make(obj.name)`` on the instance for the block; restores exactly what was there."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, make(getattr(obj, name)))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _kds_patch(pipe: Any, kds: KDS, layout: Any) -> Iterator[None]:
    """The scheduler patched with ``kds`` (and ``layout``, None for spatial latents) for the block; afterwards
    unpatched, or patched again with what it carried before (its KDS and its layout)."""
    earlier, earlier_layout = patched_kds(pipe), patched_layout(pipe)
    apply_patch(pipe, kds, layout=layout)
    try:
        yield
    finally:
        if earlier is None:
            remove_patch(pipe)
        else:
            apply_patch(pipe, earlier, layout=earlier_layout)
