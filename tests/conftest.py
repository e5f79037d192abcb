import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def foreign_image(tmp_path) -> tuple[Path, Path]:
    """An image that is not a bundled sample (odd, non-square size) with a sidecar beside it."""
    rng = np.random.default_rng(7)
    h, w = 217, 333
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.float64)
    img[60:150, 100:220] = (200, 40, 40)  # a red "box" object
    img += rng.normal(0, 6, img.shape)
    path = tmp_path / "gradient.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    sidecar = {
        "objects": [
            {"name": "Red Box", "detail": "A flat red rectangle in the middle.", "box": [0.3, 0.27, 0.66, 0.7]},
            {"name": "Gradient Sky", "detail": "A smooth colour gradient from dark to light.",
             "box": [0.0, 0.0, 1.0, 0.3]},
        ],
        "caption": "A synthetic test picture: a red rectangle sits in the centre of a smooth diagonal "
        "gradient that runs from dark blue in the top left corner to warm yellow in the bottom right, "
        "with fine noise over everything, like a calibration card photographed in poor light.",
    }
    side = tmp_path / "gradient.json"
    side.write_text(json.dumps(sidecar))
    return path, side
