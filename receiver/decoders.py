"""The decoder a DecoderConfig asks for: an object with ``render(stage) -> uint8 (H, W, 3)``.

The classical decoder needs no weights; the diffusion decoder (and torch, diffusers) loads only when asked for.
"""

from __future__ import annotations

from miscnet.core.config import DecoderConfig


def make_decoder(config: DecoderConfig | None = None):
    """The decoder ``config`` names (default: the classical one)."""
    config = config or DecoderConfig()
    if config.name == "classical":
        from miscnet.receiver.classical import ClassicalDecoder

        return ClassicalDecoder()
    from miscnet.receiver.diffusion import DiffusionDecoder

    return DiffusionDecoder(config.diffusion)
