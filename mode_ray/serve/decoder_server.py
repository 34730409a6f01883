"""The decoder deployment of a latent mixture: `Decoder` in the `mode-ray` application (AppArgs.decoder).

The experts and the wire work on latents; the decoder (a diffusers AutoencoderKL / AutoencoderTiny,
mode_ray.models.decoder) runs once per image at the end. In its own deployment it sits on a GPU (or a GPU
share) beside the experts, is shared by every router replica, and merges concurrent requests' latents into
one pass (`@serve.batch`); the router only sends latents `(N, c, h, w)` and receives images `(N, C, H, W)`.
`AppArgs.decoder.placement = "router"` runs it in the router process instead (no extra replica).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from mode_ray import env
from mode_ray.models.decoder import LatentDecoder, load_decoder

logger = logging.getLogger("ray.serve")


class DecoderServer:
    """Serve deployment class: latents `(N, c, h, w)` float32 -> decoded images `(N, C, H, W)` float32 in
    about [-1, 1] (`GenerationResult.with_decoded` maps them to [0, 1]).

    `device=None` takes MODE_RAY_DEVICE, else cuda when torch sees a GPU. Calls that arrive together are
    decoded in one pass of at most `chunk_images` images at a time (a decoder's activations are large)."""

    def __init__(
        self,
        decoder_dir: str,
        device: str | None = None,
        max_batch_size: int = 8,
        chunk_images: int = 16,
        max_images: int = 1024,
    ) -> None:
        device = device or env.device()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"decoder {decoder_dir}: device {device!r} was requested but torch sees no GPU "
                "(give the decoder deployment num_gpus > 0, or leave device unset)"
            )
        started = time.perf_counter()
        self.decoder: LatentDecoder = load_decoder(decoder_dir, device)
        self.channels = self.decoder.latent_channels
        self._chunk, self._max_images = chunk_images, max_images
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")  # one pass at a time
        # per instance, not on the class: a class-level batch queue would be shared by every instance
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.0)(
            self._decode_calls
        )
        logger.info("decoder %s loaded on %s in %.2fs", decoder_dir, device, time.perf_counter() - started)

    def _check(self, latents: np.ndarray) -> np.ndarray:
        if not isinstance(latents, np.ndarray) or latents.ndim != 4:
            raise ValueError(f"latents must be an array (N, {self.channels}, h, w), got {_describe(latents)}")
        if latents.shape[1] != self.channels:
            raise ValueError(f"latents have {latents.shape[1]} channels; this decoder takes {self.channels}")
        if not 1 <= latents.shape[0] <= self._max_images:
            raise ValueError(f"latents: 1 to {self._max_images} images per call, got {latents.shape[0]}")
        return np.ascontiguousarray(latents, dtype=np.float32)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents (N, c, h, w) -> images (N, C, H, W), both float32; ValueError naming what is wrong."""
        return await self._batched(self._check(latents))

    async def _decode_calls(self, calls: list[np.ndarray]) -> list[np.ndarray]:
        z = np.concatenate(calls) if len(calls) > 1 else calls[0]
        images = await asyncio.get_running_loop().run_in_executor(self._executor, self._decode, z)
        bounds = np.cumsum([0] + [len(c) for c in calls])
        return [images[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _decode(self, z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            parts = [
                self.decoder(torch.from_numpy(z[i : i + self._chunk])) for i in range(0, len(z), self._chunk)
            ]
        return torch.cat(parts).float().numpy()


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {list(x.shape)}"
    return type(x).__name__
