import itertools
import json

import numpy as np
import pytest
from PIL import Image

from sspo.errors import SSPOError
from sspo.toy import video_oracle, video_world

CHANCE = {"color": 1 / len(video_world.VALUES["color"]), "shape": 1 / len(video_world.VALUES["shape"]),
          "direction": 1 / len(video_world.DIRECTIONS)}


def rendered(seeds, per_scene=1):
    """(scene, clip) for every scene, `per_scene` clips each, under each seed."""
    clips = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        clips += [(s, video_world.render(s, rng)) for s in video_world.all_scenes() for _ in range(per_scene)]
    return clips


def mean_scores(pairs) -> dict:
    results = [video_oracle.score(clip, scene) for scene, clip in pairs]
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


@pytest.fixture(scope="module")
def clips():
    return rendered(seeds=range(4))


def test_split_is_by_combination_and_every_pair_of_values_is_seen_in_train():
    train, heldout = video_world.split_scenes("train"), video_world.split_scenes("heldout")
    assert len(video_world.all_scenes()) == 4 * 3 * 4 == 48
    assert (len(train), len(heldout)) == (38, 10)
    assert not set(train) & set(heldout)
    for pair in itertools.combinations(video_world.ATTRIBUTES, 2):
        seen = {tuple(getattr(s, name) for name in pair) for s in train}
        assert {tuple(getattr(s, name) for name in pair) for s in heldout} <= seen


def test_prompts_round_trip():
    for scene in video_world.all_scenes():
        assert video_world.parse_prompt(scene.prompt) == scene
    assert video_world.parse_prompt(" A Red Circle moving LEFT ") == video_world.VideoScene("red", "circle", "left")
    assert video_world.parse_prompt("a red circle on the left") is None
    assert {"moving", "left", "right", "up", "down", "triangle"} <= set(video_world.vocabulary())


def test_render_is_a_uint8_clip_fixed_by_the_seed():
    scene = video_world.VideoScene("green", "triangle", "up")
    first = video_world.render(scene, np.random.default_rng(11))
    assert first.shape == (video_world.NUM_FRAMES, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, video_world.render(scene, np.random.default_rng(11)))
    assert not np.array_equal(first, video_world.render(scene, np.random.default_rng(12)))
    assert all(not np.array_equal(a, b) for a, b in zip(first, first[1:]))


def test_oracle_scores_renders_right_on_every_attribute(clips):
    scores = mean_scores(clips)
    assert all(scores[name] >= 0.98 for name in video_world.ATTRIBUTES), scores
    for scene, clip in clips[:48]:
        assert video_oracle.detect(clip)["direction"] == scene.direction


def test_oracle_reads_float_frames_and_pil_frames_alike(clips):
    for scene, clip in clips[:24]:
        expected = video_oracle.score(clip, scene)
        assert video_oracle.score(clip.astype(np.float32) / 255, scene) == expected
        assert video_oracle.score([Image.fromarray(frame) for frame in clip], scene) == expected


@pytest.mark.parametrize("tamper", ["reversed", "static", "shuffled"])
def test_motion_tampering_drops_direction_to_chance_but_keeps_colour_and_shape(clips, tamper):
    rng = np.random.default_rng(0)
    edits = {
        "reversed": lambda clip: clip[::-1],
        "static": lambda clip: np.repeat(clip[:1], len(clip), axis=0),
        "shuffled": lambda clip: clip[rng.permutation(len(clip))],
    }
    scores = mean_scores([(scene, edits[tamper](clip)) for scene, clip in clips])
    assert scores["direction"] <= CHANCE["direction"], scores
    assert scores["color"] >= 0.98 and scores["shape"] >= 0.98, scores


def test_noise_and_blank_clips_score_at_most_chance(clips):
    rng = np.random.default_rng(1)
    noise = [(scene, rng.integers(0, 256, clip.shape, dtype=np.uint8)) for scene, clip in clips[:96]]
    scores = mean_scores(noise)
    assert all(scores[name] <= CHANCE[name] for name in video_world.ATTRIBUTES), scores
    scene = video_world.all_scenes()[0]
    for grey in (0, 128, 230):
        assert video_oracle.score(np.full((8, 32, 32, 3), grey, np.uint8), scene)["score"] == 0.0


def test_oracle_judges_each_attribute_on_its_own():
    clip = video_world.render(video_world.VideoScene("blue", "square", "left"), np.random.default_rng(5))
    assert video_oracle.score(clip, video_world.VideoScene("red", "circle", "left")) == {
        "color": 0.0, "shape": 0.0, "direction": 1.0, "score": 1 / 3}
    assert video_oracle.score(clip, video_world.VideoScene("blue", "square", "right")) == {
        "color": 1.0, "shape": 1.0, "direction": 0.0, "score": 2 / 3}


def test_oracle_rejects_channels_first_clips(clips):
    with pytest.raises(ValueError, match="frames, H, W, 3"):
        video_oracle.score(clips[0][1].transpose(0, 3, 1, 2), clips[0][0])


def test_gif_round_trip_is_lossless_even_for_repeated_frames_and_many_colours(tmp_path, clips):
    rng = np.random.default_rng(2)
    clip = clips[0][1]
    palettes = rng.integers(0, 256, (8, 200, 3), dtype=np.uint8)  # 200 colours a frame, ~1600 over the clip
    many_colours = np.stack([palette[rng.integers(0, 200, (32, 32))] for palette in palettes])
    for original in (clip, clip[[0, 0, 1, 2, 2, 2, 3, 3]], np.repeat(clip[:1], 8, axis=0), many_colours):
        video_world.write_clip(original, tmp_path / "clip.gif")
        assert np.array_equal(video_world.read_clip(tmp_path / "clip.gif"), original)
    with pytest.raises(ValueError, match="256 colours"):
        video_world.write_clip(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), tmp_path / "noise.gif")


def test_reading_a_missing_or_broken_clip_is_a_user_error(tmp_path):
    with pytest.raises(SSPOError, match="not found"):
        video_world.read_clip(tmp_path / "missing.gif")
    (tmp_path / "broken.gif").write_bytes(b"GIF89a not really")
    with pytest.raises(SSPOError, match="not a readable GIF clip"):
        video_world.read_clip(tmp_path / "broken.gif")


def test_generate_writes_clips_and_metadata_fixed_by_the_seed(tmp_path):
    summary = video_world.generate(tmp_path / "a", samples_per_scene=1, seed=0)
    lines = (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()
    assert summary["num_clips"] == len(lines) == 48
    assert len(list((tmp_path / "a" / "clips").glob("*.gif"))) == 96
    heldout = set(video_world.split_scenes("heldout"))
    for line in lines:
        row = json.loads(line)
        scene = video_world.VideoScene(row["color"], row["shape"], row["direction"])
        assert row["caption"] == scene.prompt
        assert row["split"] == ("heldout" if scene in heldout else "train")
        winner = video_world.read_clip(tmp_path / "a" / row["file"])
        assert winner.shape == (8, 32, 32, 3)
        assert video_oracle.score(winner, scene)["score"] == 1.0
        assert video_oracle.score(video_world.read_clip(tmp_path / "a" / row["loser"]), scene)["score"] < 1.0
    video_world.generate(tmp_path / "b", samples_per_scene=1, seed=0)
    video_world.generate(tmp_path / "c", samples_per_scene=1, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()
