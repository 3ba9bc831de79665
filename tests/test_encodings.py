"""Latents and prompt embeddings stored at prepare time (`--encode-with`), and training on them instead of encoding
pixels and captions every step."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from failure_tools import assert_nothing_published, assert_one_line_error
from sspo import config
from sspo.cli import main
from sspo.models import latent_sample, load_components, prompt_conditioning
from sspo.prepare import prepare, to_unit_range
from sspo.run_store import read_log
from sspo.stages import run_train
from sspo.train.data import ShardDataset

# 40 pairs in shards of 16 encoded 6 at a time: several shards, several encoder calls per shard, a short last one.
SAMPLES, SHARD_SIZE, ENCODE_BATCH = 40, 16, 6
TINY = {"steps": 4, "batch_size": 4, "save_every": 2, "sample_steps": 2, "lr_warmup_steps": 1}
# Not bit-equal: the stored distributions come from the VAE run on a shard's batches, the raw path's from the VAE
# run on the training batch, and conv/attention kernels differ in the last bits with the batch's size and make-up.
# Those differences (~1e-7 relative) grow through the steps' weight updates, to ~5e-6 relative in the fourth dpo step
# here, still well below this.
LOSS_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def prepare_pairs(source, output, model=""):
    return prepare(source, str(output), keep_pairs=True, limit=SAMPLES, shard_size=SHARD_SIZE, encode_with=model,
                   encode_batch_size=ENCODE_BATCH)


@pytest.fixture(scope="module")
def raw_pairs(toy_world, tmp_path_factory):
    """Pairs prepared without encodings, as every dataset was before --encode-with."""
    output = tmp_path_factory.mktemp("encodings") / "raw"
    prepare_pairs(toy_world, output)
    return str(output)


@pytest.fixture(scope="module")
def encoded_pairs(toy_world, base_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("encodings") / "encoded"
    prepare_pairs(toy_world, output, base_model)
    return str(output)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_batches(function, items, size=ENCODE_BATCH):
    """`function` over `items` in the batches prepare encodes them in, results concatenated."""
    return torch.cat([function(items[start:start + size]) for start in range(0, len(items), size)])


def assert_shards_hold_the_encoders_output(prepared: str, model: str, parts) -> None:
    manifest = json.loads((Path(prepared) / "manifest.json").read_text())
    assert [shard["num_samples"] for shard in manifest["shards"]] == [16, 16, 8]
    encoders = ["text_encoder", "text_encoder_2"] if parts.family == "sdxl" else ["text_encoder"]
    weights = {"vae/diffusion_pytorch_model.safetensors", *(f"{folder}/model.safetensors" for folder in encoders)}
    assert manifest["encoded_with"] == {
        "model": str(Path(model).absolute()),
        "weights": {name: sha256(Path(model) / name) for name in weights}}
    for shard in manifest["shards"]:
        tensors = load_file(Path(prepared) / shard["tensors"])
        captions = [json.loads(line)["caption"]
                    for line in (Path(prepared) / shard["captions"]).read_text().splitlines()]
        for role in ("winner", "loser"):
            pixels = to_unit_range(tensors[role])
            with torch.no_grad():
                mean = in_batches(lambda batch: parts.vae.encode(batch).latent_dist.mean, pixels)
                logvar = in_batches(lambda batch: parts.vae.encode(batch).latent_dist.logvar, pixels)
            assert tensors[f"{role}_latent_mean"].dtype == torch.float32
            assert torch.equal(tensors[f"{role}_latent_mean"], mean)
            assert torch.equal(tensors[f"{role}_latent_logvar"], logvar)
        assert torch.equal(tensors["prompt_hidden"], in_batches(lambda batch: parts.encode(batch).hidden, captions))
        if parts.family == "sdxl":
            assert torch.equal(tensors["prompt_pooled"], in_batches(lambda batch: parts.encode(batch).pooled, captions))
        else:
            assert "prompt_pooled" not in tensors


def test_sd_shards_hold_latent_distributions_and_prompt_embeddings(encoded_pairs, raw_pairs, base_model):
    parts = load_components(base_model)
    assert_shards_hold_the_encoders_output(encoded_pairs, base_model, parts)

    data = ShardDataset(encoded_pairs)
    stored = data.rows(range(len(data)))
    batch = data.batch([3, 0, 3])
    assert torch.equal(batch["latent_mean"], stored["latent_mean"][[3, 0, 3]])
    assert "pixels" not in batch and "loser_pixels" not in batch  # the latents replace the images: not read
    assert batch["latent_mean"].shape == (3, 4, parts.latent_size, parts.latent_size)
    assert batch["loser_latent_logvar"].shape == batch["latent_mean"].shape
    assert batch["prompt_hidden"].shape == (3, *parts.encode(["x"]).hidden.shape[1:])
    assert "prompt_pooled" not in batch
    # the same images as without encodings
    raw = ShardDataset(raw_pairs)
    raw_rows = raw.rows(range(len(raw)))
    assert torch.equal(stored["winner"], raw_rows["winner"]) and stored["captions"] == raw_rows["captions"]
    assert raw.encoded_with is None and "latent_mean" not in raw_rows
    unwanted = ShardDataset(encoded_pairs, encodings=False)
    assert unwanted.encoded_with is None and "latent_mean" not in unwanted.rows(range(len(unwanted)))


def test_latents_and_conditioning_come_from_the_encodings_with_the_same_random_draws(encoded_pairs, base_model):
    parts = load_components(base_model)
    indices = [5, 1, 30, 12]
    encoded = ShardDataset(encoded_pairs).batch(indices)
    raw = ShardDataset(encoded_pairs, encodings=False).batch(indices)
    assert "pixels" not in encoded and "loser_pixels" not in encoded
    del encoded["captions"]  # so the encodings alone must serve
    generators = [torch.Generator().manual_seed(7) for _ in range(2)]
    with torch.no_grad():
        for role in ("winner", "loser"):
            from_encodings, from_pixels = (latent_sample(parts, batch, generator, role)
                                           for batch, generator in zip((encoded, raw), generators))
            torch.testing.assert_close(from_encodings, from_pixels, rtol=1e-5, atol=1e-6)
    # the same noise was drawn: every later draw of the step is the same
    assert torch.equal(generators[0].get_state(), generators[1].get_state())
    from_embeddings, from_captions = prompt_conditioning(parts, encoded), prompt_conditioning(parts, raw)
    torch.testing.assert_close(from_embeddings.hidden, from_captions.hidden, rtol=1e-5, atol=1e-6)
    assert from_embeddings.pooled is None and from_captions.pooled is None


def losses(output) -> list[float]:
    return [row["loss"] for row in read_log(str(output))]


def train(model, data, output, **overrides):
    return run_train(config.load("train", None, {"model": model, "data": data, "output": str(output), **TINY,
                                                 **overrides}))


@pytest.mark.parametrize("objective", ["dpo", "sspo"])
def test_training_on_encodings_matches_training_on_pixels(base_model, encoded_pairs, raw_pairs, tmp_path, objective):
    train(base_model, raw_pairs, tmp_path / "raw", objective=objective)  # a dataset without encodings trains as before
    train(base_model, encoded_pairs, tmp_path / "encoded", objective=objective)
    raw, encoded = losses(tmp_path / "raw"), losses(tmp_path / "encoded")
    assert len(raw) == 4
    torch.testing.assert_close(torch.tensor(encoded), torch.tensor(raw), **LOSS_TOLERANCE)
    if objective == "dpo":
        # with the knob off the stored encodings are ignored: the run is the raw one, bit for bit
        train(base_model, encoded_pairs, tmp_path / "ignored", objective=objective, use_encodings=False)
        assert losses(tmp_path / "ignored") == raw


def test_encodings_of_another_model_are_a_one_line_error(encoded_pairs, sdxl_model, base_model, tmp_path, capsys):
    code = main(["train", "--params", "", "--model", sdxl_model, "--data", encoded_pairs,
                 "--output", str(tmp_path / "run"), "--objective", "dpo"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "train", f"made with {Path(base_model).absolute()}",
                          f"those of {Path(sdxl_model).absolute()}", "--encode-with", "use_encodings: false")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sdxl_shards_hold_pooled_embeddings_and_train_like_pixels(toy_world, sdxl_model, raw_pairs, tmp_path):
    prepare_pairs(toy_world, tmp_path / "encoded", sdxl_model)
    assert_shards_hold_the_encoders_output(str(tmp_path / "encoded"), sdxl_model, load_components(sdxl_model))

    for name, data in (("raw", raw_pairs), ("encoded", str(tmp_path / "encoded"))):
        train(sdxl_model, data, tmp_path / name, objective="sspo", steps=2)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "encoded")), torch.tensor(losses(tmp_path / "raw")),
                               **LOSS_TOLERANCE)


def test_encode_with_flag_reaches_prepare(toy_world, tmp_path, capsys):
    code = main(["prepare", "--params", "", "--source", toy_world, "--output", str(tmp_path / "out"),
                 "--encode-with", str(tmp_path / "no-model"), "--encode-batch-size", "4"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "prepare", f"not a directory: {tmp_path / 'no-model'}")
    assert_nothing_published(tmp_path / "out")
