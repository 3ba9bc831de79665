"""The video path end to end on the toy video world: world, prepare, bootstrap, train (full, motion modules, LoRA),
resume, evaluate."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sspo import config
from sspo.errors import SSPOError
from sspo.models import latent_sample, load_components
from sspo.run_store import RunStore, read_log
from sspo.stages import run_bootstrap, run_evaluate, run_prepare, run_world
from sspo.toy.video_world import NUM_FRAMES, read_clip, render, VideoScene, write_clip
from sspo.train.data import ShardDataset
from test_scorers import clip_dir  # noqa: F401  (a tiny CLIP: an image reward model)
from train_tools import RESUME, flags, kill_between_checkpoints, sspo_command, train, without_timings

RESOLUTION = 32


@pytest.fixture(scope="module")
def video_world(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("video") / "world")
    run_world(config.load("world", None, {"output": output, "samples_per_scene": 1, "video": True}))
    return output


@pytest.fixture(scope="module")
def video_prepared(video_world, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("video") / "prepared")
    run_prepare(config.load("prepare", None, {"source": video_world, "output": output, "frames": NUM_FRAMES,
                                              "keep_pairs": True}))
    return output


@pytest.fixture(scope="module")
def video_model(video_world, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("video") / "base")
    run_bootstrap(config.load("bootstrap", None, {
        "world": video_world, "output": output, "family": "video", "vae_steps": 30, "vae_batch_size": 16,
        "unet_steps": 20, "unet_batch_size": 4}))
    return output


def test_prepare_stores_the_worlds_clips_as_uint8_frames(video_world, video_prepared):
    manifest = json.loads((Path(video_prepared) / "manifest.json").read_text())
    assert manifest["frames"] == NUM_FRAMES and manifest["format"] == "sspo-shards/1" and manifest["paired"]
    assert manifest["num_samples"] == 48 and manifest["skipped"] == {}
    tensors = load_file(Path(video_prepared) / manifest["shards"][0]["tensors"])
    assert tensors["winner"].shape == (48, NUM_FRAMES, 3, RESOLUTION, RESOLUTION)
    assert tensors["winner"].dtype == torch.uint8 and tensors["loser"].shape == tensors["winner"].shape
    first = json.loads((Path(video_world) / "metadata.jsonl").read_text().splitlines()[0])
    stored_clip = tensors["winner"][0].permute(0, 2, 3, 1).numpy()
    assert np.array_equal(stored_clip, read_clip(Path(video_world) / first["file"]))

    # Decoded in worker processes, or in parts prepared on their own and merged: the same clips.
    for name, settings in (("workers", {"workers": 2}), ("parts", {"parts": 2})):
        output = Path(video_prepared).parent / name
        summary = run_prepare(config.load("prepare", None, {"source": video_world, "output": str(output),
                                                            "frames": NUM_FRAMES, "keep_pairs": True, **settings}))
        assert summary["frames"] == NUM_FRAMES and summary["num_samples"] == 48
        again = ShardDataset(str(output), encodings=False).rows(list(range(48)))
        assert torch.equal(again["winner"], tensors["winner"]) and torch.equal(again["loser"], tensors["loser"])

    batch = ShardDataset(video_prepared).batch([0, 1])
    assert batch["pixels"].shape == (2, NUM_FRAMES, 3, RESOLUTION, RESOLUTION)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert batch["loser_pixels"].shape == batch["pixels"].shape


def test_prepare_counts_bad_clips_and_reads_frame_folders(tmp_path):
    source = tmp_path / "clips"
    source.mkdir()
    clip = render(VideoScene("red", "circle", "left"), np.random.default_rng(0))
    write_clip(clip, source / "good.gif")
    (source / "good.txt").write_text("a red circle moving left")
    write_clip(clip[:3], source / "short.gif")
    (source / "short.txt").write_text("a red circle moving left")
    (source / "broken.gif").write_bytes(b"GIF89a not really")
    (source / "broken.txt").write_text("a red circle moving left")
    write_clip(clip, source / "uncaptioned.gif")
    (source / "frames").mkdir()
    for number, frame in enumerate(clip[::-1]):
        Image.fromarray(frame).save(source / "frames" / f"{number:04d}.png")
    (source / "frames.txt").write_text("a red circle moving right")

    summary = run_prepare(config.load("prepare", None, {"source": str(source), "output": str(tmp_path / "out"),
                                                        "frames": NUM_FRAMES}))
    assert summary["num_samples"] == 2 and summary["frames"] == NUM_FRAMES
    assert summary["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "short_clip": 1}
    tensors = load_file(tmp_path / "out" / "shard-00000.safetensors")
    captions = (tmp_path / "out" / "shard-00000.jsonl").read_text().splitlines()
    clips = {json.loads(line)["caption"]: tensors["winner"][i].permute(0, 2, 3, 1).numpy()
             for i, line in enumerate(captions)}
    assert np.array_equal(clips["a red circle moving left"], clip)
    assert np.array_equal(clips["a red circle moving right"], clip[::-1])

    with pytest.raises(SSPOError, match=r"bad sample broken\.gif: corrupt_image"):
        run_prepare(config.load("prepare", None, {"source": str(source), "output": str(tmp_path / "failed"),
                                                  "frames": NUM_FRAMES, "on_error": "fail"}))


def test_bootstrapped_video_model_is_an_animatediff_folder_loaded_offline(video_model, monkeypatch):
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = AnimateDiffPipeline.from_pretrained(video_model, local_files_only=True)
    assert type(pipeline.unet) is UNetMotionModel
    stored = load_file(Path(video_model) / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(tensor, stored[name]) for name, tensor in pipeline.unet.state_dict().items())
    frames = pipeline(["a red circle moving left"], num_frames=NUM_FRAMES, num_inference_steps=2, height=RESOLUTION,
                      width=RESOLUTION, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, NUM_FRAMES, RESOLUTION, RESOLUTION, 3)
    record = json.loads((Path(video_model) / "bootstrap.json").read_text())
    assert 0.5 < record["wrong_caption_fraction"] < 1  # systematic caption errors, directions among them


def test_bootstrap_refuses_a_world_of_the_other_kind(video_world, toy_world, tmp_path):
    with pytest.raises(SSPOError, match="--family video"):
        run_bootstrap(config.load("bootstrap", None, {"world": video_world, "output": str(tmp_path / "sd")}))
    with pytest.raises(SSPOError, match="sspo world --video"):
        run_bootstrap(config.load("bootstrap", None, {"world": toy_world, "output": str(tmp_path / "video"),
                                                      "family": "video"}))


def test_video_latents_are_five_dimensional_and_stored_ones_draw_the_same(video_model, video_world, tmp_path):
    encoded = str(tmp_path / "encoded")
    run_prepare(config.load("prepare", None, {"source": video_world, "output": encoded, "frames": NUM_FRAMES,
                                              "encode_with": video_model, "limit": 4}))
    parts = load_components(video_model)
    with_encodings = ShardDataset(encoded).batch([0, 1, 2])
    from_pixels = ShardDataset(encoded, encodings=False).batch([0, 1, 2])
    assert with_encodings["latent_mean"].shape == (3, 4, NUM_FRAMES, 8, 8)
    stored = latent_sample(parts, with_encodings, torch.Generator().manual_seed(3))
    encoded_now = latent_sample(parts, from_pixels, torch.Generator().manual_seed(3))
    assert stored.shape == (3, 4, NUM_FRAMES, 8, 8)
    torch.testing.assert_close(stored, encoded_now, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora_rank, train_modules", [(0, "all"), (0, "motion"), (4, "motion")])
def test_one_sspo_step_trains_what_train_modules_names(video_model, video_prepared, tmp_path, lora_rank,
                                                       train_modules):
    summary = train(video_model, video_prepared, tmp_path / "run", steps=1, batch_size=2, save_every=1,
                    lr_warmup_steps=0, lora_rank=lora_rank, train_modules=train_modules)
    assert summary["final_step"] == 1 and math.isfinite(summary["final_loss"])
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    weights = load_file(checkpoint / "unet.safetensors")
    if lora_rank:
        assert weights and all("lora" in name and "motion_modules" in name for name in weights)
        assert json.loads((checkpoint / "checkpoint.json").read_text())["train_modules"] == "motion"
        return
    base = load_file(Path(video_model) / "unet" / "diffusion_pytorch_model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], weights[name])}
    motion = {name for name in changed if "motion_modules" in name}
    assert motion, "no motion module weight was trained"
    if train_modules == "motion":
        assert changed == motion
    else:
        assert changed - motion, "the spatial UNet was not trained"


def test_motion_modules_of_an_image_model_are_one_clear_error(base_model, prepared, tmp_path):
    with pytest.raises(SSPOError, match="train_modules motion"):
        train(base_model, prepared, tmp_path / "run", train_modules="motion")
    with pytest.raises(SSPOError, match="train_modules must be one of"):
        config.load("train", None, {"train_modules": "spatial"})


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_killed_and_resumed_video_run_ends_bit_identical(video_model, video_prepared, tmp_path, lora_rank):
    settings = {**RESUME, "batch_size": 2, "lora_rank": lora_rank, "train_modules": "motion"}
    train(video_model, video_prepared, tmp_path / "straight", **settings)
    output = str(tmp_path / "resumed")
    store = RunStore(output)
    common = flags({"model": video_model, "data": video_prepared, "output": output, **settings})
    kill_between_checkpoints(sspo_command("train", *common), store.local / "train_log.jsonl", tmp_path,
                             lambda: store.latest_checkpoint() == store.checkpoint_url(4))
    resumed = subprocess.run(sspo_command("train", *common), capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert without_timings(read_log(str(output))) == without_timings(read_log(str(tmp_path / "straight")))
    for step in (4, 8):
        name = Path("checkpoints") / f"step-{step:07d}" / "unet.safetensors"
        straight, again = load_file(tmp_path / "straight" / name), load_file(Path(output) / name)
        assert straight.keys() == again.keys()
        assert all(straight[k].equal(again[k]) for k in straight), f"step {step} differs after resume"


def test_evaluate_saves_every_clip_scores_it_with_the_video_oracle_and_rescores_alike(
        video_model, video_prepared, tmp_path):
    train(video_model, video_prepared, tmp_path / "run", steps=1, batch_size=2, save_every=1, lr_warmup_steps=0,
          lora_rank=4, train_modules="motion")
    output = tmp_path / "eval"
    run_evaluate(config.load("evaluate", None, {
        "model": video_model, "checkpoint": str(tmp_path / "run"), "output": str(output), "seeds": [0, 1],
        "sample_steps": 2, "max_prompts": 2, "bootstrap_samples": 50}))
    rows = [json.loads(line) for line in (output / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 2  # models × prompt sets × prompts × seeds
    assert {row["model"] for row in rows} == {"base", "trained"}
    for row in rows:
        assert row["file"].endswith(".gif") and "direction" in row
        assert set(row["scores"]["oracle"]) == {"score", "color", "shape", "direction"}
        assert read_clip(output / row["file"]).shape == (NUM_FRAMES, RESOLUTION, RESOLUTION, 3)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["sampler"]["frames"] == NUM_FRAMES
    assert "direction" in (output / "report.md").read_text()
    win_rate = metrics["win_rate"]["oracle"]["all"]
    assert win_rate["n"] == 8 and 0 <= win_rate["ci_low"] <= win_rate["rate"] <= win_rate["ci_high"] <= 1
    with Image.open(output / "grid-train.png") as grid:
        # 2 prompts; per model and seed the first, middle and last frames
        assert grid.size[0] > grid.size[1] and grid.size[0] >= 2 * 2 * 3 * RESOLUTION

    rescored = tmp_path / "rescored"
    run_evaluate(config.load("evaluate", None, {"rescore": str(output), "output": str(rescored)}))
    assert json.loads((rescored / "metrics.json").read_text())["models"] == metrics["models"]

    with pytest.raises(SSPOError, match="know positions for"):
        run_evaluate(config.load("evaluate", None, {"model": video_model, "output": str(tmp_path / "long"),
                                                    "frames": 64}))


def test_exported_full_video_model_carries_the_trained_motion_modules(video_model, video_prepared, tmp_path):
    from diffusers import AnimateDiffPipeline

    from sspo.stages import run_export

    train(video_model, video_prepared, tmp_path / "run", steps=2, save_every=2, batch_size=2, sample_steps=2,
          train_modules="motion")  # the first step's learning rate is 0 (warm-up)
    run_export(config.load("export", None, {"checkpoint": str(tmp_path / "run"), "output": str(tmp_path / "out")}))
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-0000002" / "unet.safetensors")
    exported = load_file(tmp_path / "out" / "motion_adapter" / "diffusion_pytorch_model.safetensors")
    base = load_file(Path(video_model) / "motion_adapter" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == base.keys()
    motion = {name: tensor for name, tensor in trained.items() if "motion_modules" in name}
    assert len(motion) == len(exported) and all(motion[name].equal(exported[name]) for name in exported)
    assert any(not exported[name].equal(base[name]) for name in exported), "the base's motion modules were kept"
    pipeline = AnimateDiffPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert pipeline.motion_adapter is not None


def test_experiment_runs_its_arms_on_video_and_tabulates_direction(video_model, video_prepared, tmp_path):
    from sspo.experiment import run_experiment

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  train_modules: motion\n  sample_steps: 2\n  lr_warmup_steps: 0\n  save_every: 1\n"
                      "evaluate:\n  max_prompts: 2\n  bootstrap_samples: 20\n")
    table = run_experiment(config.load("experiment", None, {
        "model": video_model, "data": video_prepared, "output": str(tmp_path / "exp"), "shared_params": str(params),
        "arms": "sft,dpo,sspo", "seeds": "0", "steps": 1, "batch_size": 2, "eval_seeds": "0",
        "eval_sample_steps": 2}))["table"]
    assert "| colour (held-out) | direction (held-out) | shape (held-out) |" in table
    assert "(colour, shape, direction correct)" in table
    rows = json.loads((tmp_path / "exp" / "results.json").read_text())["runs"]
    assert [row["arm"] for row in rows] == ["sft", "dpo", "sspo"]
    assert all(0 <= row["heldout_direction"] <= 1 for row in rows)


def write_video(frames: np.ndarray, path: Path, codec: str = "libx264") -> None:
    """Frames (F, H, W, 3) uint8 as a video file, encoded by FFmpeg through PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".webm", "libvpx-vp9")])
def test_prepare_reads_video_files(tmp_path, suffix, codec):
    """Video files decode to their frames (lossy, so close to the rendered clip, and still the clip the oracle
    knows); a short or damaged file is a bad sample."""
    from sspo.toy import video_oracle

    source = tmp_path / "clips"
    source.mkdir()
    scene = VideoScene("blue", "square", "up")
    clip = render(scene, np.random.default_rng(0))
    write_video(clip, source / f"good{suffix}", codec)
    (source / "good.txt").write_text(scene.prompt)
    write_video(clip[:3], source / f"short{suffix}", codec)
    (source / "short.txt").write_text(scene.prompt)
    (source / f"broken{suffix}").write_bytes((source / f"good{suffix}").read_bytes()[:200])
    (source / "broken.txt").write_text(scene.prompt)

    summary = run_prepare(config.load("prepare", None, {"source": str(source), "output": str(tmp_path / "out"),
                                                        "frames": NUM_FRAMES}))
    assert summary["num_samples"] == 1
    assert summary["skipped"] == {"corrupt_image": 1, "short_clip": 1}
    stored = load_file(tmp_path / "out" / "shard-00000.safetensors")["winner"][0].permute(0, 2, 3, 1).numpy()
    assert stored.shape == clip.shape
    assert np.abs(stored.astype(int) - clip).mean() < 8
    assert video_oracle.score(stored, scene)["score"] == 1.0


def test_reward_models_score_clips_frame_by_frame(video_model, clip_dir, tmp_path):
    """An image reward model on a video model's clips: each clip's score is the mean of its frames' scores."""
    from sspo.evaluate import scorers

    output = tmp_path / "eval"
    run_evaluate(config.load("evaluate", None, {
        "model": video_model, "output": str(output), "seeds": [0], "sample_steps": 2, "max_prompts": 2,
        "prompts": ["toy:heldout"], "scorers": ["pickscore", "oracle"], "scorer_paths": {"pickscore": str(clip_dir)},
        "bootstrap_samples": 20}))
    rows = [json.loads(line) for line in (output / "index.jsonl").read_text().splitlines()]
    frame_scorer = scorers.build("pickscore", {"pickscore": str(clip_dir)})
    for row in rows:
        frames = [Image.fromarray(frame) for frame in read_clip(output / row["file"])]
        expected = frame_scorer.score(frames, [row["prompt"]] * len(frames), [None] * len(frames)).mean()
        assert row["scores"]["pickscore"]["score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert len({row["scores"]["pickscore"]["score"] for row in rows}) > 1


def test_kfp_pipeline_runs_on_the_video_world_by_parameters(video_model, video_world, tmp_path):
    """The whole KFP pipeline under kfp.local on clips: prepare 8 frames, train the motion modules, evaluate with
    the video oracle, register, promote and export an AnimateDiff folder."""
    from diffusers import AnimateDiffPipeline

    from sspo import registry
    from sspo.pipelines.local import run_local

    registry_url = str(tmp_path / "registry")
    outputs = run_local(tmp_path / "work", {
        "data_frames": NUM_FRAMES, "train_modules": "motion", "eval_frames": NUM_FRAMES, "steps": 2, "batch_size": 2,
        "sample_steps": 2, "save_every": 2, "eval_prompts": "toy:heldout", "eval_seeds": "0", "eval_sample_steps": 2,
        "min_win_rate": 0.0}, registry=registry_url, model=video_model, data=video_world)
    assert outputs["promoted"] is True
    assert 0.0 <= outputs["metrics"]["models.trained.heldout.oracle.direction"] <= 1.0
    exported = registry.export_url(registry_url, "sspo", "1")
    pipe = AnimateDiffPipeline.from_pretrained(exported, local_files_only=True)
    assert pipe.unet.config.motion_max_seq_length >= NUM_FRAMES
