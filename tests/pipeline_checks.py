"""Checks shared by the end-to-end tests of kds_hook.diffusers.run on tiny pipelines (one test file per family).

Each check states one guarantee of run() and can fail: bit-identity with the plain pipeline where the computation
is literally the same (strength 0, one particle, the same batch), agreement to rounding plus a leak check where
the batch layout differs (chunking, a different number of inputs), one decode per input, and selection in the
scheduler's latent space.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import torch

from kds_hook import KDS
from kds_hook.diffusers import apply_patch, remove_patch, run
from kds_hook.diffusers.families import family_of
from kds_hook.diffusers.patch import patched_kds
from reference import reference_mean_shift
from rounding import assert_equal_to_rounding as equal_to_rounding


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def family(pipe):
    return family_of(pipe)[1]


def denoiser_of(pipe):
    """The denoising network: the family's for pipelines run() drives, else the transformer or UNet."""
    try:
        return getattr(pipe, family(pipe).denoisers[0])
    except ValueError:  # a pipeline only the apply_patch recipe drives
        return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def assert_pristine(pipe) -> None:
    """No instance attribute of ours is left on the pipeline's components."""
    fam = family(pipe)
    assert patched_kds(pipe) is None
    assert not {"step", "convert_model_output"} & set(vars(pipe.scheduler))
    assert "decode" not in vars(getattr(pipe, fam.autoencoder))
    for name in fam.denoisers:
        if getattr(pipe, name, None) is not None:
            assert "forward" not in vars(getattr(pipe, name))


# Runs whose denoiser or decoder batch differs are not literally the same computation (see tests/rounding.py):
# float32 rounding amplified over a few steps of a random network stays far below 1e-4 of the values' magnitude.
PIPELINE_ULPS = 1e-4 / torch.finfo(torch.float32).eps


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, leaked: torch.Tensor) -> None:
    """:func:`rounding.assert_equal_to_rounding` at the tolerance of a few pipeline steps (:data:`PIPELINE_ULPS`)."""
    equal_to_rounding(actual, expected, leaked, ulps=PIPELINE_ULPS)


def as_array(images: Any) -> np.ndarray:
    """Images of any output_type ("np", "pt", PIL lists, lists of frames) as one float array."""
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    if isinstance(images, list):
        return np.stack([as_array(entry) for entry in images])
    return np.asarray(images, dtype=np.float32)


@contextlib.contextmanager
def decoded_rows(pipe) -> Iterator[List[int]]:
    """The number of rows of every autoencoder decode inside the block."""
    vae = getattr(pipe, family(pipe).autoencoder)
    seen: List[int] = []
    decode = vae.decode
    vae.decode = lambda z, *args, **kwargs: (seen.append(z.shape[0]), decode(z, *args, **kwargs))[1]
    try:
        yield seen
    finally:
        del vae.decode


@contextlib.contextmanager
def denoiser_batch_sizes(pipe) -> Iterator[List[int]]:
    """The batch size of every call of the denoiser's forward inside the block (an instance override, which
    run()'s chunking wraps and restores: it sees every chunk)."""
    seen: List[int] = []
    denoiser = denoiser_of(pipe)
    forward = denoiser.forward

    def recording(*args, **kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        seen.append(x.shape[0])
        return forward(*args, **kwargs)

    denoiser.forward = recording
    try:
        yield seen
    finally:
        del denoiser.forward


def final_latents(pipe, kds: KDS, **call_kwargs) -> torch.Tensor:
    """The final latents (scheduler space, spatial, from the decoder's input) of a plain pipeline call on a batch
    already expanded by hand, steered by ``kds`` through apply_patch (None: not steered): with ``num_particles`` =
    every row, what a leak across inputs gives."""
    fam = family(pipe)
    seen = []
    vae = getattr(pipe, fam.autoencoder)
    decode = vae.decode
    vae.decode = lambda z, *args, **kwargs: (seen.append(z), decode(z, *args, **kwargs))[1]
    layout = None if fam.layout is None else fam.layout(pipe, call_kwargs)
    if kds is not None:
        apply_patch(pipe, kds, layout=layout)
    try:
        pipe(**call_kwargs)
    finally:
        remove_patch(pipe)
        del vae.decode
    return fam.to_latent_space(pipe, seen[-1])


# ------------------------------------------------------------------------------------------- the guarantees


def check_strength_zero_and_one_particle(pipe, n: int, inputs: Dict[str, Any], expanded: Dict[str, Any],
                                         single: Dict[str, Any], **common) -> None:
    """Strength 0 gives the plain pipeline on the hand-expanded batch (``expanded``: every input repeated N times,
    contiguously) bit for bit, particles and decoded images; one particle gives the plain pipeline on ``single``
    (the inputs as they are) bit for bit; afterwards nothing of ours is left on the pipeline."""
    off = run(pipe, KDS(num_particles=n, strength=0.0), generator=seeded(), return_particles=True, **inputs, **common)
    assert_pristine(pipe)
    plain = pipe(**expanded, generator=seeded(), **common)
    items = off.index.shape[0]
    np.testing.assert_array_equal(as_array(off.particle_images).reshape(as_array(_images(pipe, plain)).shape),
                                  as_array(_images(pipe, plain)))
    # The particles are the decoder's input mapped back by the family's scaling: exactly that map of the plain
    # pipeline's decoder input, and the scheduler's own latents (output_type="latent") up to that map's rounding.
    assert torch.equal(off.particles.flatten(0, 1), final_latents(pipe, None, generator=seeded(), **expanded, **common))
    plain_latents = pipe(**expanded, generator=seeded(), **dict(common, output_type="latent"))
    spatial = _spatial_output(pipe, expanded, _images(pipe, plain_latents))
    torch.testing.assert_close(off.particles.flatten(0, 1), spatial, rtol=1e-6, atol=1e-6 * float(spatial.abs().max()))
    assert off.particles.shape[:2] == (items, n)

    one = run(pipe, KDS(num_particles=1, bandwidth="auto"), generator=seeded(), **single, **common)
    plain_one = pipe(**single, generator=seeded(), **common)
    np.testing.assert_array_equal(as_array(one.images), as_array(_images(pipe, plain_one)))
    assert one.index.tolist() == [0] * one.index.shape[0]


def _images(pipe, output):
    return getattr(output, family(pipe).output)


def _spatial_output(pipe, call_kwargs, latents):
    fam = family(pipe)
    return latents if fam.layout is None else fam.layout(pipe, call_kwargs).to_spatial(latents)


def check_one_decode_per_input_and_selection(pipe, kds: KDS, inputs: Dict[str, Any], items: int, **common) -> None:
    """The autoencoder decodes one latent per item (all N with return_particles); the selected index is Eq. 9 on
    the returned particles (the scheduler's latent space), and the decoded image is that particle's."""
    n = kds.num_particles
    with decoded_rows(pipe) as seen:
        one = run(pipe, kds, generator=seeded(), **inputs, **common)
        every = run(pipe, kds, generator=seeded(), return_particles=True, **inputs, **common)
    assert seen == [items, items * n]
    assert one.particles is None and one.particle_images is None
    assert torch.equal(every.index, kds.select(every.particles.flatten(0, 1)).index)
    assert torch.equal(one.index, every.index)
    assert torch.equal(one.latents, every.latents)
    picked = every.particles[torch.arange(items), every.index]
    assert torch.equal(every.latents, picked)
    # Decoding B rows instead of B*N is a different decoder batch: equal to rounding, and each is its own particle.
    chosen = as_array(every.particle_images)[np.arange(items), every.index.numpy()]
    np.testing.assert_allclose(as_array(one.images), chosen, rtol=0.0, atol=1e-4)


def check_inputs_never_mix(pipe, kds: KDS, inputs: Dict[str, Any], changed: Dict[str, Any], **common) -> None:
    """Changing input 1 leaves input 0's particles and selection exactly as they were (the same batch layout), and
    does change input 1's."""
    first = run(pipe, kds, generator=seeded(), return_particles=True, **inputs, **common)
    second = run(pipe, kds, generator=seeded(), return_particles=True, **changed, **common)
    assert torch.equal(first.particles[0], second.particles[0])
    assert torch.equal(first.index[0], second.index[0])
    assert not torch.equal(first.particles[1], second.particles[1])


def check_chunking(pipe, kds: KDS, inputs: Dict[str, Any], expanded: Dict[str, Any], max_batch_size: int,
                   **common) -> List[int]:
    """max_batch_size splits every denoiser call into chunks of at most that many rows; the result equals the
    unchunked run to rounding, while one ensemble of all rows (a leak across inputs, the same noise) lies far
    outside that tolerance. Returns the unchunked calls' batch sizes."""
    with denoiser_batch_sizes(pipe) as seen:
        whole = run(pipe, kds, generator=seeded(), return_particles=True, **inputs, **common)
        unchunked = list(seen)
        seen.clear()
        chunked = run(pipe, kds, generator=seeded(), return_particles=True, max_batch_size=max_batch_size,
                      **inputs, **common)
    assert_pristine(pipe)
    assert min(unchunked) > max_batch_size  # every call is really split
    assert seen == [min(max_batch_size, size - start) for size in unchunked for start in range(0, size, max_batch_size)]
    rows = whole.particles.shape[0] * whole.particles.shape[1]
    everything = KDS(num_particles=rows, patch_size=kds.patch_size, bandwidth=kds.bandwidth,
                     strength=kds.gate.strength, threshold=kds.gate.threshold)
    leaked = final_latents(pipe, everything, generator=seeded(), **expanded, **common)
    assert_equal_to_rounding(chunked.particles.flatten(0, 1), whole.particles.flatten(0, 1), leaked)
    return unchunked


@contextlib.contextmanager
def flow_steps(pipe) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Every FlowMatchEulerDiscreteScheduler step inside the block: its sigma, sample and the model output it was
    given (the steered one under a KDS patch, which wraps this instance override), in float64."""
    sched = pipe.scheduler
    step = type(sched).step
    seen: List[Dict[str, torch.Tensor]] = []

    def recording(self, model_output, timestep, sample, *args, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        seen.append(dict(sigma=self.sigmas[self.step_index].double(), sample=sample.double(),
                         velocity=model_output.double()))
        return step(self, model_output, timestep, sample, *args, **kwargs)

    sched.step = recording.__get__(sched)
    try:
        yield seen
    finally:
        del sched.step


@contextlib.contextmanager
def denoiser_outputs(pipe) -> Iterator[List[torch.Tensor]]:
    """The output of every (whole, unchunked) denoiser call inside the block, in float64."""
    seen: List[torch.Tensor] = []
    hook = denoiser_of(pipe).register_forward_hook(lambda module, args, output: seen.append(output[0].detach().double()))
    try:
        yield seen
    finally:
        hook.remove()


def check_flow_steering(pipe, kds: KDS, steps, model_outputs, to_spatial: Callable[[torch.Tensor], torch.Tensor],
                        guide: Callable[[List[torch.Tensor], int], torch.Tensor]) -> int:
    """Every flow-matching step continued from the literal reference mean shift (Algorithm 2) of the model's x0,
    x0 = sample - sigma * velocity, taken in spatial layout (``to_spatial`` unpacks), with the strength the gate
    gave that step (``kds.history``); ``guide(model_outputs, i)`` is the velocity the pipeline formed at step i
    (classifier-free guidance applied). Returns the number of steered steps."""
    assert len(kds.history) == len(steps) > 0
    steered = 0
    for i, (step, record) in enumerate(zip(steps, kds.history)):
        velocity = guide(model_outputs, i)
        x0 = to_spatial(step["sample"] - step["sigma"] * velocity)
        used = to_spatial(step["sample"] - step["sigma"] * step["velocity"])
        assert abs(record.t_frac - float(step["sigma"])) < 1e-5  # the gate reads sigma as t/T
        if record.strength > 0:
            steered += 1
            expected = reference_mean_shift(x0, kds.num_particles, float(kds.bandwidth), kds.patch_size,
                                            record.strength)
            assert (expected - x0).abs().max() > 1e-3  # the steering is not negligible here
        else:
            expected = x0
        torch.testing.assert_close(used, expected, rtol=1e-4, atol=1e-4)
    return steered
