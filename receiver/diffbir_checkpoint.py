"""Where DiffBIR v1's checkpoint is and how it is read (light: torch is imported only to read it).

``resolve_checkpoint`` finds the file for ``--diffbir-model`` (a file, or a folder holding
``general_full_v1.ckpt`` or a single checkpoint), with the usual fallbacks (MISCNET_DIFFBIR_MODEL,
``$MISCNET_MODELS_DIR/diffbir``); ``read_checkpoint`` reads its tensors with safetensors or
``torch.load(weights_only=True)``, never running pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path

from miscnet.core.errors import MiscError

CHECKPOINT_NAMES = ("general_full_v1.ckpt", "general_full_v1.safetensors")  # DiffBIR v1's release name
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pth", ".pt")


def resolve_checkpoint(value: str | os.PathLike[str] | None = None) -> Path:
    """The DiffBIR checkpoint file for an option value (file, or a folder holding one), with the usual
    fallbacks (MISCNET_DIFFBIR_MODEL, $MISCNET_MODELS_DIR/diffbir); one MiscError line naming the path tried."""
    from miscnet.core.pretrained import configured

    found, source = configured("diffbir", value)
    if found is None:
        raise MiscError("no DiffBIR model configured: give --diffbir-model FILE|FOLDER (DiffBIR v1's "
                        "general_full_v1.ckpt) or set MISCNET_DIFFBIR_MODEL (or MISCNET_MODELS_DIR to a folder "
                        "holding 'diffbir/'); see experiments/MODELS.md")
    path = Path(found).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        if len(files) == 1:
            return files[0]
        what = "no checkpoint" if not files else f"{len(files)} checkpoints and none named {CHECKPOINT_NAMES[0]}"
        raise MiscError(f"DiffBIR model folder {path} ({source}) holds {what} "
                        f"({', '.join(CHECKPOINT_SUFFIXES)} files)")
    raise MiscError(f"DiffBIR model {path} ({source}) does not exist: give --diffbir-model the path of DiffBIR "
                    "v1's general_full_v1.ckpt (or a folder holding it)")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's tensors by name: safetensors, or a torch file read with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            import torch

            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickled code refused by weights_only, not a checkpoint at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiscError(f"DiffBIR checkpoint {path} could not be read as weights only: {first[:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # a Lightning checkpoint
        sd = sd["state_dict"]
    import torch

    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    if not sd:
        raise MiscError(f"DiffBIR checkpoint {path} holds no tensors (not a state dict)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


