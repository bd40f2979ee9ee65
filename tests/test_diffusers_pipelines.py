"""End-to-end tests of kds_hook.diffusers.run on tiny random-weight pipelines (kds_hook.testing).

The tiny UNets are random, so "steering works" is checked against exact expectations, not image quality:
strength 0 and N = 1 are bit-identical to the plain pipeline on the N-expanded batch with the same noise, the x0
the scheduler continues from is the literal reference mean shift of the guided x0, chunked equals unchunked, and
inputs never mix.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# Tiny models: extra threads only spin (and on a shared machine make these tests several times slower).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from kds_hook import KDS  # noqa: E402
from kds_hook.diffusers import apply_patch, remove_patch  # noqa: E402
from kds_hook.diffusers.patch import patched_kds  # noqa: E402
from kds_hook.diffusers.pipeline import SUPPORTED_PIPELINES, KDSPipelineOutput, run  # noqa: E402

from reference import reference_mean_shift  # noqa: E402
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (  # noqa: E402
    preprocess as LDMSuperResolutionPreprocess,
)
from kds_hook.testing import LDM_SR_SCHEDULERS, reload_pipeline, tiny_ldm_sr_pipeline, tiny_sd_pipeline  # noqa: E402

from pipeline_checks import (  # noqa: E402
    assert_equal_to_rounding,
    assert_pristine,
    denoiser_batch_sizes,
    final_latents,
    seeded,
)

N = 3
STEPS = 3
# Random tiny models give x0 particles far apart in units of a 0.3 bandwidth, where the kernel weights vanish;
# the median-heuristic bandwidth keeps the steering visible.
STRONG = dict(num_particles=N, bandwidth="auto", strength=0.5)


def low_res(items: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(items, 3, 8, 8, generator=seeded(seed)) * 2 - 1


def sd_inputs(kind: str, prompts=("a red cat", "a blue dog"), seed: int = 2) -> dict:
    kwargs = dict(prompt=list(prompts), height=32, width=32, num_inference_steps=STEPS, guidance_scale=5.0)
    if kind != "text2img":
        kwargs["image"] = torch.rand(len(prompts), 3, 32, 32, generator=seeded(seed))
    if kind == "inpaint":
        mask = torch.zeros(len(prompts), 1, 32, 32)
        mask[..., 8:24, 8:24] = 1.0
        kwargs["mask_image"] = mask
    return kwargs


@functools.lru_cache(maxsize=None)
def ldm_sr(scheduler: str):
    return tiny_ldm_sr_pipeline(scheduler)


@functools.lru_cache(maxsize=None)
def sd(kind: str, scheduler: str = "ddim"):
    return tiny_sd_pipeline(kind, scheduler)


# ---------------------------------------------------------------------------------------------- LDM-SR


@pytest.mark.parametrize("scheduler", LDM_SR_SCHEDULERS)
def test_ldm_sr_freeu_pattern(scheduler):
    """Steered differs from plain; strength 0 is the plain pipeline bit for bit; afterwards nothing is left."""
    pipe = ldm_sr(scheduler)
    image = low_res()
    plain = pipe(image.repeat_interleave(N, dim=0), num_inference_steps=STEPS, generator=seeded(), output_type="pt")
    plain = plain.images.reshape(2, N, 3, 32, 32)

    common = dict(image=image, num_inference_steps=STEPS, output_type="pt", return_particles=True)
    off = run(pipe, KDS(**{**STRONG, "strength": 0.0}), generator=seeded(), **common)
    assert_pristine(pipe)
    assert torch.equal(off.particle_images, plain)
    steered = run(pipe, KDS(**STRONG), generator=seeded(), **common)
    assert_pristine(pipe)
    assert (steered.particle_images - plain).abs().max() > 1e-3

    assert steered.images.shape == (2, 3, 32, 32)  # 4x the 8x8 input
    assert steered.particles.shape == (2, N, 3, 8, 8)
    assert steered.particle_images.shape == (2, N, 3, 32, 32)
    after = pipe(image.repeat_interleave(N, dim=0), num_inference_steps=STEPS, generator=seeded(), output_type="pt")
    never_patched = tiny_ldm_sr_pipeline(scheduler)(
        image.repeat_interleave(N, dim=0), num_inference_steps=STEPS, generator=seeded(), output_type="pt"
    )
    assert torch.equal(after.images, never_patched.images)


def test_ldm_sr_selection_decodes_one_latent_per_input():
    pipe = ldm_sr("ddim")
    calls = []
    original = pipe.vqvae.decode

    def counting_decode(z, *args, **kwargs):
        calls.append(z.shape[0])
        return original(z, *args, **kwargs)

    pipe.vqvae.decode = counting_decode
    try:
        kds = KDS(**STRONG)
        common = dict(image=low_res(), num_inference_steps=STEPS, generator=seeded(), output_type="pt")
        selected = run(pipe, kds, **common)
        assert calls == [2]  # B = 2 rows decoded, not B*N = 6
        assert selected.particles is None and selected.particle_images is None
        common["generator"] = seeded()
        everything = run(pipe, kds, return_particles=True, **common)
        assert calls == [2, 2 * N]
        assert pipe.vqvae.decode is counting_decode  # our own override of decode is restored, not removed
    finally:
        del pipe.vqvae.decode

    # Eq. 9 in latent space, and the decoded image is that particle's.
    flat = everything.particles.reshape(2 * N, 3, 8, 8)
    assert torch.equal(everything.index, kds.select(flat).index)
    assert torch.equal(selected.index, everything.index)
    for b in range(2):
        i = int(everything.index[b])
        assert torch.equal(everything.latents[b], everything.particles[b, i])
        assert torch.equal(selected.latents[b], everything.latents[b])
        torch.testing.assert_close(selected.images[b], everything.particle_images[b, i], rtol=0, atol=1e-6)
        assert torch.equal(everything.images[b], everything.particle_images[b, i])


def test_ldm_sr_pil_inputs_and_reloaded_pipeline(tmp_path):
    """PIL in, PIL 4x out; a save_pretrained/from_pretrained round trip gives the same result."""
    pipe = ldm_sr("euler")
    pil = [PIL.Image.fromarray((np.random.default_rng(s).random((32, 32, 3)) * 255).astype(np.uint8)) for s in (0, 1)]
    kds = KDS(**STRONG)
    out = run(pipe, kds, image=pil, num_inference_steps=2, generator=seeded(), return_particles=True)
    assert isinstance(out, KDSPipelineOutput)
    assert [im.size for im in out.images] == [(128, 128), (128, 128)]
    single = run(pipe, kds, image=pil[0], num_inference_steps=2, generator=seeded(), return_particles=True)
    # Input 1 did not leak into input 0's ensemble: a UNet batch of N or 2N rows rounds differently on CPU, so the
    # particles agree to rounding, while one ensemble of all 2N particles (the same noise) is far from them.
    rows = torch.cat([LDMSuperResolutionPreprocess(im) for im in pil]).repeat_interleave(N, dim=0)
    leaked = final_latents(
        pipe, KDS(**dict(STRONG, num_particles=2 * N)), image=rows, num_inference_steps=2, generator=seeded()
    )
    assert_equal_to_rounding(single.particles[0], out.particles[0], leaked[:N])

    loaded = reload_pipeline(pipe)
    again = run(loaded, kds, image=pil[0], num_inference_steps=2, generator=seeded(), return_particles=True)
    assert torch.equal(again.particles, single.particles)  # the same batch: literally the same computation
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(single.images[0]))


def test_ldm_sr_inputs_never_mix():
    pipe = ldm_sr("dpmpp")
    image = low_res()
    changed = image.clone()
    changed[1] = -changed[1]
    kwargs = dict(num_inference_steps=STEPS, output_type="pt", return_particles=True)
    first = run(pipe, KDS(**STRONG), image=image, generator=seeded(), **kwargs)
    second = run(pipe, KDS(**STRONG), image=changed, generator=seeded(), **kwargs)
    assert torch.equal(first.particles[0], second.particles[0])
    assert torch.equal(first.images[0], second.images[0])
    assert not torch.equal(first.particles[1], second.particles[1])


def test_ldm_sr_chunked_equals_unchunked():
    pipe = ldm_sr("ddim")
    with denoiser_batch_sizes(pipe) as seen:
        kwargs = dict(image=low_res(), num_inference_steps=STEPS, output_type="pt", return_particles=True)
        whole = run(pipe, KDS(**STRONG), generator=seeded(), **kwargs)
        assert set(seen) == {2 * N}
        seen.clear()
        chunked = run(pipe, KDS(**STRONG), generator=seeded(), max_batch_size=4, **kwargs)
        assert seen == [4, 2] * STEPS
    assert_pristine(pipe)
    # UNet batches of 4 and 2 rows round differently from one of 6: equal to rounding, and far from a leak.
    leaked = final_latents(
        pipe, KDS(**dict(STRONG, num_particles=2 * N)), image=low_res().repeat_interleave(N, dim=0),
        num_inference_steps=STEPS, generator=seeded(),
    )
    assert_equal_to_rounding(chunked.particles.flatten(0, 1), whole.particles.flatten(0, 1), leaked)
    torch.testing.assert_close(chunked.particle_images, whole.particle_images, rtol=0.0, atol=1e-4)


def test_one_particle_is_the_plain_pipeline():
    pipe = ldm_sr("ddim")
    image = low_res()
    kwargs = dict(num_inference_steps=STEPS, output_type="pt")
    out = run(pipe, KDS(num_particles=1, bandwidth="auto"), image=image, generator=seeded(), **kwargs)
    plain = pipe(image, generator=seeded(), **kwargs).images
    assert torch.equal(out.images, plain)
    assert out.index.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------- Stable Diffusion


@pytest.mark.parametrize(
    "kind, scheduler", [("text2img", "ddim"), ("img2img", "ddim"), ("inpaint", "ddim"), ("text2img", "dpmpp")]
)
def test_sd_cfg_steers_the_guided_prediction(kind, scheduler):
    """The x0 the scheduler continues from is the reference mean shift of the x0 of the guided prediction.

    DDIM: ``step``'s pred_original_sample. DPM-Solver++: the output of ``convert_model_output``, which is what
    its multistep history stores.
    """
    pipe = sd(kind, scheduler)
    sched = pipe.scheduler
    guidance = 5.0
    unet_out, seen = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: unet_out.append(output[0]))
    method = "step" if scheduler == "ddim" else "convert_model_output"
    original = getattr(sched, method)

    # Installed before run(), so the KDS patch wraps it: it sees the steered model output.
    @functools.wraps(original)
    def recording(model_output, *args, **kwargs):
        result = original(model_output, *args, **kwargs)
        if method == "step":
            timestep, sample = args[:2]
            seen.append((int(timestep), sample, result[1]))  # pred_original_sample
        else:
            seen.append((int(sched.timesteps[sched.step_index]), kwargs["sample"], result))
        return result

    setattr(sched, method, recording)
    kds = KDS(num_particles=N, bandwidth=2.0, strength=0.3)
    try:
        steps = STEPS if scheduler == "ddim" else 4  # DPM-Solver's linspace timesteps: 4 steps reach t/T < 0.3
        out = run(pipe, kds, generator=seeded(), **dict(sd_inputs(kind), num_inference_steps=steps))
        assert getattr(sched, method) is recording  # our own override is restored, not removed
    finally:
        delattr(sched, method)
        hook.remove()
    assert_pristine(pipe)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)

    assert len(seen) == len(unet_out) >= 2  # img2img runs strength x STEPS steps
    gated = 0
    for (t, sample, x0_seen), noise in zip(seen, unet_out):
        uncond, text = noise.chunk(2)  # the pipeline's CFG batch: unconditional half first
        eps = uncond + guidance * (text - uncond)
        alpha_bar = sched.alphas_cumprod[t].double()
        x0 = (sample.double() - (1 - alpha_bar).sqrt() * eps.double()) / alpha_bar.sqrt()
        if t / sched.config.num_train_timesteps >= kds.gate.threshold:
            gated += 1
            expected = reference_mean_shift(x0, N, 2.0, 1, 0.3)
            assert (expected - x0).abs().max() > 1e-2  # the steering is not negligible here
        else:
            expected = x0
        torch.testing.assert_close(x0_seen.double(), expected, rtol=1e-4, atol=1e-4)
    assert 0 < gated < len(seen)  # both open and closed steps were checked
    if scheduler == "dpmpp":  # the second-order history still holds the steered x0 of the gated step
        assert torch.equal(sched.model_outputs[-2], seen[-2][2])


def test_sd_strength_zero_is_plain_pipeline_and_expansion_is_contiguous():
    """Inpaint: prompts, images and masks are repeated per input, contiguously; particles are the plain run's."""
    pipe = sd("inpaint")
    inputs = sd_inputs("inpaint")
    plain = pipe(
        **{
            **inputs,
            "prompt": [p for p in inputs["prompt"] for _ in range(N)],
            "image": inputs["image"].repeat_interleave(N, dim=0),
            "mask_image": inputs["mask_image"].repeat_interleave(N, dim=0),
        },
        generator=seeded(),
        output_type="np",
    ).images
    off = KDS(num_particles=N, strength=0.0)
    out = run(pipe, off, generator=seeded(), output_type="np", return_particles=True, **inputs)
    assert np.array_equal(out.particle_images.reshape(plain.shape), plain)
    assert out.images.shape == (2, 32, 32, 3)


def test_sd_inputs_never_mix_and_broadcast():
    pipe = sd("img2img")
    inputs = sd_inputs("img2img")
    changed = dict(inputs, prompt=[inputs["prompt"][0], "something else entirely"])
    first = run(pipe, KDS(**STRONG), generator=seeded(), output_type="latent", **inputs)
    second = run(pipe, KDS(**STRONG), generator=seeded(), output_type="latent", **changed)
    assert torch.equal(first.latents[0], second.latents[0])
    assert not torch.equal(first.latents[1], second.latents[1])
    assert torch.equal(first.images, first.latents)  # output_type="latent": the selected latents

    # One prompt serves two images; per-input generators make each input's particles its own.
    shared = dict(inputs, prompt="a red cat")
    a = run(pipe, KDS(**STRONG), generator=[seeded(0), seeded(1)], output_type="latent", **shared)
    b = run(pipe, KDS(**STRONG), generator=[seeded(0), seeded(7)], output_type="latent", **shared)
    assert torch.equal(a.latents[0], b.latents[0])
    assert not torch.equal(a.latents[1], b.latents[1])


def test_sd_chunked_equals_unchunked_with_cfg():
    pipe = sd("text2img")
    with denoiser_batch_sizes(pipe) as seen:
        kwargs = dict(sd_inputs("text2img"), output_type="np", return_particles=True)
        whole = run(pipe, KDS(**STRONG), generator=seeded(), **kwargs)
        assert set(seen) == {2 * 2 * N}  # CFG doubles the B*N batch
        seen.clear()
        chunked = run(pipe, KDS(**STRONG), generator=seeded(), max_batch_size=5, **kwargs)
        assert seen == [5, 5, 2] * STEPS
    assert_pristine(pipe)
    # UNet batches of 5, 5 and 2 rows round differently from one of 12: equal to rounding, and far from a leak.
    inputs = sd_inputs("text2img")
    inputs["prompt"] = [p for p in inputs["prompt"] for _ in range(N)]
    leaked = final_latents(  # in the scheduler's space, as run() reports latents
        pipe, KDS(**dict(STRONG, num_particles=2 * N)), generator=seeded(), output_type="np", **inputs
    )
    assert_equal_to_rounding(chunked.particles.flatten(0, 1), whole.particles.flatten(0, 1), leaked)
    np.testing.assert_allclose(chunked.particle_images, whole.particle_images, rtol=0.0, atol=1e-4)


def test_sd_reloaded_pipeline_is_the_same():
    pipe = sd("inpaint")
    loaded = reload_pipeline(pipe)  # also writes and reads back the tiny tokenizer
    assert type(loaded) is type(pipe)
    assert loaded.tokenizer("a red cat").input_ids == pipe.tokenizer("a red cat").input_ids
    kwargs = dict(sd_inputs("inpaint"), output_type="latent")
    first = run(pipe, KDS(**STRONG), generator=seeded(), **kwargs)
    again = run(loaded, KDS(**STRONG), generator=seeded(), **kwargs)
    assert torch.equal(first.latents, again.latents)


def test_sd_num_images_per_prompt_and_user_latents():
    pipe = sd("text2img")
    inputs = sd_inputs("text2img")
    out = run(pipe, KDS(**STRONG), num_images_per_prompt=2, generator=seeded(), output_type="latent", **inputs)
    assert out.latents.shape == (4, 4, 16, 16) and out.index.shape == (4,)

    latents = torch.randn(2 * N, 4, 16, 16, generator=seeded(3))
    off = KDS(num_particles=N, strength=0.0)
    with_latents = run(pipe, off, latents=latents, output_type="latent", return_particles=True, **inputs)
    plain = pipe(
        **{**inputs, "prompt": [p for p in inputs["prompt"] for _ in range(N)]}, latents=latents, output_type="latent"
    ).images
    assert torch.equal(with_latents.particles.reshape(plain.shape), plain)


def test_existing_patch_is_kept():
    pipe = ldm_sr("ddim")
    users = KDS(num_particles=N)
    apply_patch(pipe, users)
    try:
        run(pipe, KDS(**STRONG), image=low_res(), num_inference_steps=2, generator=seeded(), output_type="pt")
        assert patched_kds(pipe) is users
    finally:
        remove_patch(pipe)
    assert_pristine(pipe)


def test_apply_patch_alone_on_a_cfg_pipeline_freeu_pattern():
    """apply_patch on the pipeline itself, N particles through num_images_per_prompt: strength 0 is the plain
    pipeline bit for bit (DDIM with eta > 0, so this also shows the pipeline still passes eta and generator to the
    patched step); steering changes the output; applying again replaces; a batch of 4 is refused for N = 3;
    after remove_patch the pipeline gives its never-patched output again."""
    pipe = sd("text2img")
    inputs = dict(sd_inputs("text2img"), output_type="latent", eta=0.7)

    def call(**extra):
        return pipe(**{**inputs, "num_images_per_prompt": N, **extra}, generator=seeded()).images

    plain = call()
    assert not torch.equal(call(eta=0.0), plain)  # eta matters here
    try:
        apply_patch(pipe, KDS(num_particles=N, strength=0.0))
        assert torch.equal(call(), plain)
        steerer = KDS(**STRONG, record=True)
        apply_patch(pipe, steerer)  # replaces the strength-0 patch
        assert patched_kds(pipe) is steerer
        steered = call()
        assert len(steerer.history) == STEPS and steerer.history[0].strength == 0.5
        assert (steered - plain).abs().max() > 1e-3
        with pytest.raises(ValueError, match="not divisible by num_particles=3"):
            call(num_images_per_prompt=2)  # 2 prompts x 2 images = 4 rows
    finally:
        remove_patch(pipe)
    assert_pristine(pipe)
    assert torch.equal(call(), plain)


def test_swapping_the_pipelines_scheduler_drops_the_patch():
    from diffusers import DPMSolverMultistepScheduler

    pipe = sd("text2img")
    patched = apply_patch(pipe, KDS(num_particles=N))
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(patched.config)
        assert patched_kds(pipe) is None and not {"step", "convert_model_output"} & set(vars(pipe.scheduler))
        remove_patch(pipe)  # a no-op on the new, unpatched scheduler: the old one keeps its patch
        assert patched_kds(patched) is not None
    finally:
        pipe.scheduler = patched
        remove_patch(pipe)
    assert "step" not in vars(patched)
    assert patched.step.__func__ is type(patched).step


def test_sd_prompt_embeds_and_negative_prompts_are_repeated_per_input():
    """prompt_embeds / negative_prompt_embeds and a single negative prompt string (with a single prompt string, the
    CLI's call) are expanded row by row, contiguously: strength 0 gives the plain pipeline on the expanded batch."""
    pipe = sd("text2img")
    common = dict(height=32, width=32, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    off = KDS(num_particles=N, strength=0.0)
    embeds = torch.randn(2, 77, 32, generator=seeded(5))
    negative = torch.randn(2, 77, 32, generator=seeded(6))
    out = run(
        pipe, off, prompt_embeds=embeds, negative_prompt_embeds=negative, generator=seeded(),
        return_particles=True, **common,
    )
    plain = pipe(
        prompt_embeds=embeds.repeat_interleave(N, dim=0), negative_prompt_embeds=negative.repeat_interleave(N, dim=0),
        generator=seeded(), **common,
    ).images
    assert torch.equal(out.particles.reshape(plain.shape), plain)

    blurry = run(pipe, off, prompt="a red cat", negative_prompt="blurry", generator=seeded(), return_particles=True,
                 **common)
    plain = pipe(prompt=["a red cat"] * N, negative_prompt=["blurry"] * N, generator=seeded(), **common).images
    assert torch.equal(blurry.particles.reshape(plain.shape), plain)
    sharp = run(pipe, off, prompt="a red cat", negative_prompt="sharp", generator=seeded(), **common)
    assert not torch.equal(sharp.latents, blurry.latents)  # the negative prompt is used, not dropped
    two = run(pipe, off, prompt=["a red cat", "a dog"], negative_prompt="blurry", generator=seeded(), **common)
    assert two.latents.shape[0] == 2


def test_sd_inpaint_padding_mask_crop_one_decode_and_safety_flags():
    """Inpainting with padding_mask_crop (one PIL image and mask, PIL output) works; the VAE decodes one latent per
    input (N with return_particles); the safety checker's flags come back for the selected particles."""
    pipe = sd("inpaint")
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[12:20, 10:18] = 255
    decoded, flags = [], []
    decode = pipe.vae.decode

    def counting_decode(z, *args, **kwargs):
        decoded.append(z.shape[0])
        return decode(z, *args, **kwargs)

    def fake_safety_checker(images, device, dtype):
        flags.append([i % 2 == 1 for i in range(len(images))])  # flags every other row
        return images, flags[-1]

    pipe.vae.decode = counting_decode
    pipe.run_safety_checker = fake_safety_checker
    kwargs = dict(
        prompt="a red cat", image=image, mask_image=PIL.Image.fromarray(mask), padding_mask_crop=2, height=32,
        width=32, num_inference_steps=2, guidance_scale=5.0,
    )
    try:
        one = run(pipe, KDS(**STRONG), generator=seeded(), **kwargs)
        every = run(pipe, KDS(**STRONG), generator=seeded(), return_particles=True, **kwargs)
    finally:
        del pipe.vae.decode, pipe.run_safety_checker
    assert decoded == [1, N]
    assert len(one.images) == 1 and one.images[0].size == (32, 32)
    assert one.nsfw_content_detected == [False] and one.particle_nsfw_content_detected is None
    assert every.particle_nsfw_content_detected == [flags[1]]
    assert every.nsfw_content_detected == [flags[1][int(every.index[0])]]
    # selection in the scheduler's latent space: Eq. 9 on the final latents, the same with or without decoding all
    assert torch.equal(every.index, KDS(**STRONG).select(every.particles[0]).index)
    assert torch.equal(one.index, every.index) and torch.equal(every.latents[0], every.particles[0, every.index[0]])
    # the overlay pastes the generated crop into the original: pixels far from the mask are the original's
    assert np.array_equal(np.asarray(one.images[0])[:4], np.asarray(image)[:4])


# ---------------------------------------------------------------------------------------------- errors


def test_errors():
    pipe = ldm_sr("ddim")
    kwargs = dict(image=low_res(), num_inference_steps=2, output_type="pt")
    with pytest.raises(TypeError, match="kds must be a kds_hook.KDS"):
        run(pipe, {"num_particles": 3}, **kwargs)
    with pytest.raises(TypeError, match="return_dict"):
        run(pipe, KDS(num_particles=N), return_dict=False, **kwargs)
    with pytest.raises(ValueError, match="max_batch_size"):
        run(pipe, KDS(num_particles=N), max_batch_size=0, **kwargs)
    with pytest.raises(ValueError, match="LDMSuperResolutionPipeline, StableDiffusionPipeline"):
        run(object(), KDS(num_particles=N), **kwargs)
    assert "StableDiffusionInpaintPipeline" in SUPPORTED_PIPELINES
    with pytest.raises(ValueError, match="generators"):
        run(pipe, KDS(num_particles=N), generator=[seeded()] * 4, **kwargs)

    text = sd("img2img")
    with pytest.raises(ValueError, match="prompt has 2, image has 3"):
        run(text, KDS(num_particles=N), **dict(sd_inputs("img2img"), image=torch.rand(3, 3, 32, 32)))
    with pytest.raises(ValueError, match="latents has 2 rows"):
        run(sd("text2img"), KDS(num_particles=N), latents=torch.randn(2, 4, 16, 16), **sd_inputs("text2img"))

    incomplete = type("LDMSuperResolutionPipeline", (), {"unet": torch.nn.Identity(), "vqvae": None})()
    with pytest.raises(ValueError, match="has no vqvae"):
        run(incomplete, KDS(num_particles=N), **kwargs)
    from diffusers import PNDMScheduler

    unsupported = tiny_ldm_sr_pipeline("ddim")
    unsupported.scheduler = PNDMScheduler.from_config(unsupported.scheduler.config)
    with pytest.raises(ValueError, match="PNDMScheduler; supported schedulers: DDIMScheduler"):
        run(unsupported, KDS(num_particles=N), **kwargs)
    assert "step" not in vars(unsupported.scheduler)

    # An error inside the pipeline call (after patching) still restores everything.
    with pytest.raises(TypeError, match="not_an_argument"):
        run(pipe, KDS(num_particles=N), max_batch_size=2, not_an_argument=1, **kwargs)
    assert_pristine(pipe)
