"""Each reward model's code path, run on a tiny random-weight model of the same architecture, against a direct
computation written out here."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
)

from sspo import config
from sspo.cli import main
from sspo.errors import SSPOError
from sspo.evaluate import scorers
from sspo.stages import run_evaluate
from sspo.toy.model import build_tokenizer
from sspo.toy.world import Scene, parse_prompt, render

MEAN, STD = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the center"]
TINY_LAYERS = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [render(parse_prompt(p), rng) for p in PROMPTS]


def pixel_values(images) -> torch.Tensor:
    """The processor's job written out: the images are already 32×32, so only rescale and normalise."""
    array = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
    return torch.tensor(((array - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)


def token_ids(prompts, max_length=35):
    tokens = build_tokenizer()(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def save_processors(directory, processor_class):
    build_tokenizer().save_pretrained(directory)
    processor_class(size={"height": 32, "width": 32} if processor_class is BlipImageProcessor else {"shortest_edge": 32},
                    crop_size={"height": 32, "width": 32}, image_mean=MEAN.tolist(), image_std=STD.tolist()
                    ).save_pretrained(directory)


def head_weights(sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    indices = [0, 2, 4, 6, 7][: len(sizes) - 1]
    weights = {}
    for index, (n_in, n_out) in zip(indices, zip(sizes, sizes[1:])):
        weights[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
        weights[f"layers.{index}.bias"] = torch.randn(n_out, generator=generator)
    return weights


def apply_head(weights, x):
    for index in sorted({int(k.split(".")[1]) for k in weights}):
        x = x @ weights[f"layers.{index}.weight"].T + weights[f"layers.{index}.bias"]
    return x.squeeze(-1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **TINY_LAYERS}
    vision = {"hidden_size": 32, "image_size": 32, "patch_size": 8, **TINY_LAYERS}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=2.0))
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(directory)
    save_processors(directory, CLIPImageProcessor)
    save_file(head_weights([16, 1024, 128, 64, 16, 1], seed=1), directory / scorers.HEAD_FILE)
    return directory


def clip_cosine_and_image(directory, images):
    model = CLIPModel.from_pretrained(directory).eval()
    ids, mask = token_ids(PROMPTS, max_length=16)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixel_values(images)).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return model, (image * text).sum(-1), image


def test_clip_family_scores_match_direct_computation(clip_dir, images):
    model, cosine, _ = clip_cosine_and_image(clip_dir, images)
    assert cosine.abs().max() > 1e-3, "degenerate tiny model"
    expected = {
        "pickscore": model.logit_scale.exp().item() * cosine,
        "clipscore": 100 * torch.clamp(cosine, min=0),
        "hpsv2": 100 * cosine,
    }
    scenes = [parse_prompt(p) for p in PROMPTS]
    for name, values in expected.items():
        scorer = scorers.build(name, {name: str(clip_dir)})
        got = scorer.score(images, PROMPTS, scenes)
        np.testing.assert_allclose(got, values.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
    # the text matters: the same images scored against other prompts change the score
    shuffled = scorers.build("pickscore", {"pickscore": str(clip_dir)}).score(images, PROMPTS[::-1], scenes)
    assert not np.allclose(shuffled, expected["pickscore"].numpy())


def test_aesthetic_scores_match_direct_computation(clip_dir, images):
    _, _, image = clip_cosine_and_image(clip_dir, images)
    head = head_weights([16, 1024, 128, 64, 16, 1], seed=1)
    expected = apply_head(head, image)
    got = scorers.build("aesthetic", {"aesthetic": f"file://{clip_dir}"}).score(images, PROMPTS, [None] * 3)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32,
            "max_position_embeddings": 40, "pad_token_id": tokenizer.pad_token_id, **TINY_LAYERS}
    vision = {"hidden_size": 32, "image_size": 32, "patch_size": 8, **TINY_LAYERS}
    model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    directory = tmp_path_factory.mktemp("blip")
    model.save_pretrained(directory)
    save_processors(directory, BlipImageProcessor)
    return directory


def test_imagereward_scores_match_direct_computation(blip_dir, images):
    head = head_weights([32, 1024, 128, 64, 16, 1], seed=2)
    save_file(head, blip_dir / scorers.HEAD_FILE, metadata={"mean": "0.5", "std": "2.0"})
    model = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    ids, mask = token_ids(PROMPTS)
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixel_values(images)).last_hidden_state
        state = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long)
                                   ).last_hidden_state[:, 0]
    expected = (apply_head(head, state) - 0.5) / 2.0
    got = scorers.build("imagereward", {"imagereward": str(blip_dir)}).score(images, PROMPTS, [None] * 3)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(got) > 1e-4, "the reward does not depend on the input"


def test_oracle_scorer_marks_non_toy_prompts_not_applicable(images):
    scenes = [parse_prompt(p) for p in PROMPTS[:2]] + [None]
    scorer = scorers.build("oracle", {})
    got = scorer.score(images, PROMPTS, scenes)
    assert got[:2].tolist() == [1.0, 1.0] and np.isnan(got[2])
    wrong = [Scene("yellow", "circle", "left")] * 3
    assert scorer.attributes(images, wrong)["color"].tolist() == [0.0, 0.0, 0.0]


def test_missing_or_broken_model_is_one_clear_error(tmp_path, clip_dir):
    with pytest.raises(SSPOError, match=r"scorer pickscore needs --scorer-paths pickscore=<dir of a CLIPModel"):
        scorers.build("pickscore", {})
    with pytest.raises(SSPOError, match="unknown scorer 'nope'"):
        scorers.build("nope", {})
    with pytest.raises(SSPOError, match="cannot load"):
        scorers.build("clipscore", {"clipscore": str(tmp_path)})
    no_head = tmp_path / "clip-no-head"
    shutil.copytree(clip_dir, no_head)
    (no_head / scorers.HEAD_FILE).unlink()
    with pytest.raises(SSPOError, match="has no head.safetensors"):
        scorers.build("aesthetic", {"aesthetic": str(no_head)})


def test_cli_names_the_missing_scorer_path(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path), "--output", str(tmp_path / "eval"), "--scorers", "oracle,hpsv2"])
    assert code == 2
    assert "scorer hpsv2 needs --scorer-paths hpsv2=<" in capsys.readouterr().err


def test_rescore_adds_a_reward_model_to_a_finished_evaluation(base_model, clip_dir, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    run_evaluate(config.load("evaluate", None, {"model": base_model, "output": str(first), "seeds": [0, 1],
                                                "sample_steps": 2, "max_prompts": 2}))
    run_evaluate(config.load("evaluate", None, {"rescore": str(first), "output": str(again),
                                                "scorers": ["oracle", "clipscore"],
                                                "scorer_paths": {"clipscore": str(clip_dir)}}))
    before = [json.loads(line) for line in (first / "index.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (again / "index.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["seed"]) for r in rows] == [(r["file"], r["prompt"], r["seed"]) for r in before]
    assert [r["scores"]["oracle"] for r in rows] == [r["scores"]["oracle"] for r in before]
    # each saved image is scored against its own prompt
    clip = scorers.build("clipscore", {"clipscore": str(clip_dir)})
    for row in rows:
        image = Image.open(again / row["file"]).convert("RGB")
        expected = clip.score([image], [row["prompt"]], [parse_prompt(row["prompt"])])[0]
        assert row["scores"]["clipscore"]["score"] == pytest.approx(float(expected), rel=1e-5)
