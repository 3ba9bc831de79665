"""Prompt sets for evaluation: the toy world's splits built in, anything else from a file or URL.

A prompt set is named on the command line as
- `toy:train` or `toy:heldout`: the toy world's prompts of that split (the video world's, for a video model);
  `toy:validation`: the image world's validation combinations (`sspo world --validation-split`), which `toy:train`
  includes;
- `NAME=URL` or just `URL` (named after the file's stem): a text file with one prompt per line, or a `.jsonl` file
  with a "prompt" (or "caption") field per line. Blank lines are skipped.

Public benchmarks, turned into such a file:
- Pick-a-Pic validation_unique (yuvalkirstain/pickapic_v1, split validation_unique, 500 prompts): write its
  `caption` column one per line, e.g. `pd.read_parquet(f)["caption"].to_csv("pap.txt", index=False, header=False)`.
- PartiPrompts (nateraw/parti-prompts, PartiPrompts.tsv, 1632 prompts): the `Prompt` column, one per line
  (`cut -f1 PartiPrompts.tsv | tail -n +2 > parti.txt`); keep `Category` in JSONL if you want per-category tables.
- HPSv2 benchmark (hpsv2 package, `benchmark/*.json` for anime, concept-art, paintings, photo; 800 prompts each):
  each file is a JSON list of strings: `jq -r '.[]' photo.json > hps-photo.txt`, one prompt set per style.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from sspo import storage
from sspo.errors import SSPOError
from sspo.toy import video_world
from sspo.toy.world import SPLITS, Scene, parse_prompt, split_scenes

TOY_PREFIX = "toy:"


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    # the toy scene each prompt describes, None outside the toy grammar
    scenes: list[Scene | video_world.VideoScene | None]


def parse_lines(text: str, source: str) -> list[str]:
    jsonl = source.endswith(".jsonl")
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SSPOError(f"{source} line {number} is not JSON: {err}") from None
        prompt = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise SSPOError(f'{source} line {number} has no "prompt" string')
        prompts.append(prompt.strip())
    return prompts


def name_and_url(spec: str) -> tuple[str, str]:
    """A prompt set's name (the toy split, NAME of NAME=URL, else the file's stem) and its URL ('' for the toy's)."""
    if spec.startswith(TOY_PREFIX):
        return spec.removeprefix(TOY_PREFIX), ""
    name, _, url = spec.partition("=") if "=" in spec.split("://")[0] else ("", "", spec)
    return name or PurePosixPath(url).stem, url


def load(spec: str, limit: int = 0, video: bool = False) -> PromptSet:
    """The prompt set named by `spec` (see the module doc), cut to its first `limit` prompts when limit > 0; with
    `video`, toy prompts and scenes are the video world's."""
    name, url = name_and_url(spec)
    world_scenes, parse = ((video_world.split_scenes, video_world.parse_prompt) if video
                           else (split_scenes, parse_prompt))
    if spec.startswith(TOY_PREFIX):
        splits = ("train", "heldout") if video else SPLITS
        if name not in splits:
            raise SSPOError(f"unknown prompt set {spec!r}; the toy {'video ' if video else ''}world has "
                            + ", ".join(f"toy:{split}" for split in splits))
        prompts = [scene.prompt for scene in world_scenes(name)]
    else:
        prompts = parse_lines(storage.read_text(url), url)
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise SSPOError(f"prompt set {spec!r} holds no prompts")
    return PromptSet(name, prompts, [parse(p) for p in prompts])


def load_all(specs: list[str], limit: int = 0, video: bool = False) -> list[PromptSet]:
    sets = [load(spec, limit, video) for spec in specs]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise SSPOError(f"prompt sets need distinct names, got {names}; name them with NAME=URL")
    return sets
