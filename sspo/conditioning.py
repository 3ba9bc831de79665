"""What the UNet is conditioned on, for the SD-1.x/2.x family and the SDXL family.

SD: one text encoder's last hidden states. SDXL: the penultimate hidden states of both text encoders concatenated,
plus the second encoder's pooled (projected) embedding and six "time ids" per image: its original size, the top-left
corner of its crop and the target size. A `Conditioning` carries whichever parts the family has, so the trainer, the
sampler and evaluation call the UNet the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    hidden: torch.Tensor  # (B, tokens, width)
    pooled: torch.Tensor | None = None  # (B, projection width), SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only

    def __len__(self) -> int:
        return len(self.hidden)

    def _map(self, function) -> Conditioning:
        return Conditioning(*(None if part is None else function(part)
                              for part in (self.hidden, self.pooled, self.time_ids)))

    def expand(self, batch_size: int) -> Conditioning:
        """A batch-size-1 conditioning broadcast over `batch_size` samples (a view, no copy)."""
        return self._map(lambda part: part.expand(batch_size, *part.shape[1:]))

    def cat(self, other: Conditioning) -> Conditioning:
        parts = zip((self.hidden, self.pooled, self.time_ids), (other.hidden, other.pooled, other.time_ids))
        return Conditioning(*(None if mine is None else torch.cat([mine, theirs]) for mine, theirs in parts))

    def with_time_ids(self, time_ids: torch.Tensor | None) -> Conditioning:
        """These embeddings with other time ids (SDXL); SD conditioning, which has none, is returned unchanged."""
        if self.pooled is None:
            return self
        return Conditioning(self.hidden, self.pooled, time_ids.to(self.hidden.device, self.hidden.dtype))

    def unet_kwargs(self) -> dict:
        added = None if self.pooled is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": added}


def time_ids(geometry: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's time ids from per-image (original height, original width, crop top, crop left) rows."""
    target = torch.tensor([resolution, resolution], dtype=geometry.dtype).expand(len(geometry), 2)
    return torch.cat([geometry, target], dim=1).float()


def uncropped_geometry(batch_size: int, resolution: int) -> torch.Tensor:
    """The geometry of an image made at `resolution` (generated, or prepared from one of that size): no crop."""
    return torch.tensor([[resolution, resolution, 0, 0]]).expand(batch_size, 4)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(encoders: list, tokenizers: list, prompts: list[str]) -> Conditioning:
    """Text conditioning (with gradients when the encoders need them): one encoder → SD, two → SDXL."""
    device = next(encoders[0].parameters()).device
    if len(encoders) == 1:
        return Conditioning(encoders[0](token_ids(tokenizers[0], prompts).to(device))[0])
    hidden, pooled = [], None
    for encoder, tokenizer in zip(encoders, tokenizers):
        output = encoder(token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder is a ...WithProjection model: its first output is the pooled embedding
    return Conditioning(torch.cat(hidden, dim=-1), pooled)
