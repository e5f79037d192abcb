import datetime
import ipaddress
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the baselines' cache: each test session its own, so no test reads results a previous build left behind
os.environ["MISCNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="miscnet-test-cache-")


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


@pytest.fixture
def certs(tmp_path) -> tuple[dict[str, tuple[str, str]], str]:
    """Throwaway PEM files: a CA, a server (localhost, 127.0.0.1) and a client it signed, and a self-signed
    rogue; returns ({name: (cert, key)}, CA path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path / "certs"
    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)

    def make(name, issuer=None, issuer_key=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("miscnet test CA", ca=True)
    files = {}
    for name, (key, cert) in {"ca": (ca_key, ca_cert),
                              "server": make("localhost", ca_cert.subject, ca_key),
                              "client": make("sender", ca_cert.subject, ca_key),
                              "rogue": make("rogue")}.items():
        (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[name] = (str(folder / f"{name}.pem"), str(folder / f"{name}.key"))
    return files, str(folder / "ca.pem")
