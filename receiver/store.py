"""Where the receiver keeps what it received: durable, uniquely named, recoverable after a crash.

Layout under the output folder::

    .streams                      the last stream number used (stream names never repeat across restarts)
    s0007/0003-photo/image.misc   an image's layers as received, written and fsync'd before the sender
                                  is told the image is complete
    s0007/0003-photo/02-map.png   the stage images, numbered in the order the stages were made
    s0007/0003-photo/.decoded     written once the complete stage's image is on disk

An image's folder is its order of arrival in the stream (``0003``, which never repeats within a stream,
unlike image ids, which wrap) and its sanitised label, so two images with one label stay apart. A
receiver that starts finds every ``image.misc`` without ``.decoded`` and decodes it: what it
acknowledged survives a ``kill -9``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from miscnet.core.container import EncodedImage, from_bytes, to_bytes
from miscnet.core.errors import MiscError
from miscnet.core.image_io import atomic_write_bytes

IMAGE_FILE = "image.misc"
DECODED_MARK = ".decoded"
_STREAM = re.compile(r"s(\d+)$")


class ImageStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counter = self.root / ".streams"
        self._last = self._read_counter()

    def _read_counter(self) -> int:
        last = 0
        try:
            last = int(self._counter.read_text().strip() or 0)
        except (OSError, ValueError):
            pass
        # the folders too, in case the counter file was lost: a name is never handed out twice
        for child in self.root.iterdir():
            match = _STREAM.match(child.name)
            if match and child.is_dir():
                last = max(last, int(match.group(1)))
        return last

    def new_stream(self) -> str:
        """A stream name no earlier run of this receiver (on this folder) has used."""
        self._last += 1
        atomic_write_bytes(self._counter, str(self._last).encode(), durable=True)
        return f"s{self._last:04d}"

    def folder(self, stream: str, order: int, label: str) -> Path:
        return self.root / stream / f"{order:04d}-{label}"

    def store(self, folder: Path, image: EncodedImage) -> Path:
        """The image's layers, durably; MiscError if they cannot be written."""
        path = folder / IMAGE_FILE
        atomic_write_bytes(path, to_bytes(image), durable=True)  # MiscError when it cannot be written
        return path

    @staticmethod
    def mark_decoded(folder: Path) -> None:
        (folder / DECODED_MARK).touch()

    def pending(self) -> Iterator[tuple[str, Path, EncodedImage | None]]:
        """(stream, folder, image) for every stored image whose complete stage was never written.

        ``image`` is None for a file that no longer reads (a disk fault): it is reported, not decoded.
        """
        for path in sorted(self.root.glob(f"s*/*/{IMAGE_FILE}")):
            folder = path.parent
            if (folder / DECODED_MARK).exists():
                continue
            try:
                image = from_bytes(path.read_bytes())
            except (OSError, MiscError):
                image = None
            yield folder.parent.name, folder, image
