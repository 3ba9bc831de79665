"""Scorers: the toy oracle and the reward models the literature reports, behind one interface.

Every reward model is read from a directory the user provides (a local path or any fsspec URL, fetched with
`storage.fetch_dir`); nothing is downloaded from a model hub, and only safetensors weights are read.

A video model's clips are scored by the video oracle, and by any reward model here frame by frame: a clip's score is
the mean of its frames' scores against its prompt (PerFrameScorer).

Expected directory layouts (all in the Hugging Face `save_pretrained` format, with a tokenizer and an image
processor saved next to the weights):

- `pickscore`, `clipscore`, `hpsv2`: a `CLIPModel` (e.g. yuvalkirstain/PickScore_v1, openai/clip-vit-large-patch14).
  HPSv2 is released as an open_clip ViT-H-14 checkpoint; it must first be converted to the HF CLIP format (the
  converted model is the same network, so the score is the same up to numerics).
- `aesthetic`: a `CLIPModel` (openai/clip-vit-large-patch14) plus `head.safetensors`, the improved-aesthetic-predictor
  MLP 768→1024→128→64→16→1 (keys `layers.{0,2,4,6,7}.{weight,bias}`, e.g. converted from
  sac+logos+ava1-l14-linearMSE.pth with `torch.load(..., weights_only=True)` + `safetensors.torch.save_file`).
- `imagereward`: a `BlipForImageTextRetrieval` plus `head.safetensors` with the ImageReward MLP (same layer layout,
  input 768). ImageReward ships its own BLIP code; its weights must be mapped onto the HF BLIP module names. This
  is an approximation of the original: the HF BLIP text encoder is the same BERT-with-cross-attention, but the
  tokenizer's first token and the image preprocessing are whatever the provided processor does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from sspo import storage
from sspo.errors import SSPOError
from sspo.toy import oracle, video_oracle, video_world
from sspo.toy.world import ATTRIBUTES, Scene

HEAD_FILE = "head.safetensors"
# ImageReward normalises its raw reward with the mean and std it measured on its own training set.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072

EXPECTED = {
    "pickscore": "dir of a CLIPModel + processor, e.g. yuvalkirstain/PickScore_v1",
    "clipscore": "dir of a CLIPModel + processor, e.g. openai/clip-vit-large-patch14",
    "hpsv2": "dir of an HPSv2 checkpoint converted to a HF CLIPModel + processor",
    "aesthetic": f"dir of a CLIPModel ViT-L/14 + processor + {HEAD_FILE} (improved-aesthetic-predictor MLP)",
    "imagereward": f"dir of a BlipForImageTextRetrieval + processor + {HEAD_FILE} (ImageReward MLP)",
}


class Scorer:
    """Scores images against their prompts; higher is better. NaN marks an image the scorer does not apply to."""

    name: str = ""

    def score(self, images: list[Image.Image], prompts: list[str], scenes: list[Scene | None]) -> np.ndarray:
        raise NotImplementedError

    def attributes(self, images: list[Image.Image], scenes: list[Scene | None]) -> dict[str, np.ndarray]:
        """Per-attribute correctness (toy world only); empty for scorers that have none."""
        return {}


class OracleScorer(Scorer):
    """The toy oracle: the fraction of colour, shape and position that match; NaN for prompts outside the toy world.
    Clips ((frames, H, W, 3) arrays) get the video oracle: colour, shape and direction."""

    name = "oracle"

    def score(self, images, prompts, scenes):
        return self.attributes(images, scenes)["score"]

    def attributes(self, images, scenes):
        video = bool(images) and isinstance(images[0], np.ndarray) and images[0].ndim == 4
        judge, attributes = (video_oracle.score, video_world.ATTRIBUTES) if video else (oracle.score, ATTRIBUTES)
        results = [judge(image, scene) if scene is not None else None for image, scene in zip(images, scenes)]
        return {key: np.array([r[key] if r else np.nan for r in results]) for key in ("score", *attributes)}


class PerFrameScorer(Scorer):
    """An image scorer applied to clips ((frames, H, W, 3) arrays): every frame scored against the clip's prompt, the
    clip's score the mean over its frames."""

    def __init__(self, frame_scorer: Scorer):
        self.frame_scorer, self.name = frame_scorer, frame_scorer.name

    def score(self, images, prompts, scenes):
        frames = [Image.fromarray(frame) for clip in images for frame in clip]
        counts = [len(clip) for clip in images]
        repeat = lambda values: [value for value, count in zip(values, counts) for _ in range(count)]  # noqa: E731
        scores = self.frame_scorer.score(frames, repeat(prompts), repeat(scenes))
        return np.array([chunk.mean() for chunk in np.split(scores, np.cumsum(counts)[:-1])])


class _Pretrained(Scorer):
    """A transformers model with its tokenizer and image processor, read from a local directory."""

    def __init__(self, directory: Path, model_class):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = model_class.from_pretrained(directory, use_safetensors=True, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as err:
            raise SSPOError(f"scorer {self.name}: cannot load {directory} ({EXPECTED[self.name]}): {err}") from None
        self.model.to(self.device).eval()

    def text_inputs(self, prompts: list[str], max_length: int) -> dict:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [image.convert("RGB") for image in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipScorer(_Pretrained):
    """Cosine similarity of normalised CLIP image and text embeddings, scaled by each metric's own rule."""

    def __init__(self, name: str, directory: Path):
        from transformers import CLIPModel

        self.name = name
        super().__init__(directory, CLIPModel)

    @torch.no_grad()
    def embeddings(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        image = _pooled(self.model.get_image_features(pixel_values=self.pixels(images)))
        max_length = self.model.config.text_config.max_position_embeddings
        text = _pooled(self.model.get_text_features(**self.text_inputs(prompts, max_length)))
        return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)

    @torch.no_grad()
    def score(self, images, prompts, scenes):
        image, text = self.embeddings(images, prompts)
        cosine = (image * text).sum(-1)
        if self.name == "pickscore":  # PickScore: the model's own logit scale times the cosine
            values = self.model.logit_scale.exp() * cosine
        elif self.name == "clipscore":  # torchmetrics CLIPScore: 100 · max(cos, 0)
            values = 100 * cosine.clamp(min=0)
        else:  # HPSv2: cosine of the fine-tuned CLIP, reported ×100 in its benchmark tables
            values = 100 * cosine
        return values.float().cpu().numpy()


class LinearHead(torch.nn.Module):
    """The MLP head of the aesthetic predictor and ImageReward: Linear layers applied in index order, no activations
    (both originals interleave only Dropout, which is the identity at inference)."""

    def __init__(self, path: Path):
        super().__init__()
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            self.metadata = f.metadata() or {}
        indices = sorted({int(key.split(".")[1]) for key in tensors if key.startswith("layers.")})
        expected = {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}
        if not indices or set(tensors) != expected:
            raise SSPOError(f"{path}: expected only layers.N.weight/bias tensors, found {sorted(tensors)[:6]}")
        self.layers = torch.nn.ModuleList()
        for i in indices:
            weight = tensors[f"layers.{i}.weight"]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": tensors[f"layers.{i}.bias"]})
            self.layers.append(layer)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)


def _load_head(name: str, directory: Path, features: int) -> LinearHead:
    path = directory / HEAD_FILE
    if not path.exists():
        raise SSPOError(f"scorer {name}: {directory} has no {HEAD_FILE} ({EXPECTED[name]})")
    head = LinearHead(path)
    if head.in_features != features:
        raise SSPOError(f"scorer {name}: {HEAD_FILE} expects {head.in_features} features, the model gives {features}")
    return head.eval()


class AestheticScorer(ClipScorer):
    """LAION improved aesthetic predictor: MLP on the L2-normalised CLIP image embedding (prompt-independent)."""

    def __init__(self, directory: Path):
        super().__init__("aesthetic", directory)
        self.head = _load_head(self.name, directory, self.model.config.projection_dim).to(self.device)

    @torch.no_grad()
    def score(self, images, prompts, scenes):
        image = _pooled(self.model.get_image_features(pixel_values=self.pixels(images)))
        return self.head(torch.nn.functional.normalize(image, dim=-1)).float().cpu().numpy()


class ImageRewardScorer(_Pretrained):
    """ImageReward: the BLIP text encoder reads the prompt with cross-attention to the image; the MLP head maps its
    first token's state to a reward, normalised by ImageReward's mean and std (overridable in the head's metadata)."""

    name = "imagereward"
    max_length = 35  # ImageReward pads and truncates prompts to 35 tokens

    def __init__(self, directory: Path):
        from transformers import BlipForImageTextRetrieval

        super().__init__(directory, BlipForImageTextRetrieval)
        self.head = _load_head(self.name, directory, self.model.config.text_config.hidden_size).to(self.device)
        self.mean = float(self.head.metadata.get("mean", IMAGEREWARD_MEAN))
        self.std = float(self.head.metadata.get("std", IMAGEREWARD_STD))

    @torch.no_grad()
    def score(self, images, prompts, scenes):
        image_embeds = self.model.vision_model(pixel_values=self.pixels(images)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.model.text_encoder(
            **self.text_inputs(prompts, self.max_length),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        rewards = self.head(text[:, 0, :])
        return ((rewards - self.mean) / self.std).float().cpu().numpy()


BUILDERS = {
    "pickscore": lambda d: ClipScorer("pickscore", d),
    "clipscore": lambda d: ClipScorer("clipscore", d),
    "hpsv2": lambda d: ClipScorer("hpsv2", d),
    "aesthetic": AestheticScorer,
    "imagereward": ImageRewardScorer,
}
NAMES = ("oracle", *BUILDERS)


def build(name: str, paths: dict[str, str]) -> Scorer:
    """The scorer called `name`; reward models are read from `paths[name]` (a local path or URL)."""
    if name == "oracle":
        return OracleScorer()
    if name not in BUILDERS:
        raise SSPOError(f"unknown scorer {name!r}; choose from {', '.join(NAMES)}")
    if not paths.get(name):
        raise SSPOError(f"scorer {name} needs --scorer-paths {name}=<{EXPECTED[name]}>")
    return BUILDERS[name](storage.fetch_dir(paths[name]))
