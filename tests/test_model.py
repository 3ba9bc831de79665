from diffusers import DiffusionPipeline, StableDiffusionPipeline

from sspo.toy import oracle, world


def test_base_model_is_a_stable_diffusion_folder_that_diffusers_loads(base_model):
    pipeline = DiffusionPipeline.from_pretrained(base_model)
    assert isinstance(pipeline, StableDiffusionPipeline)
    image = pipeline("a red circle on the left", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    assert 0.0 <= oracle.score(image, world.Scene("red", "circle", "left"))["score"] <= 1.0
