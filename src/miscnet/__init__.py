"""miscnet: MISC ultra-low-bitrate semantic image compression as an edge-to-cloud system and simulator.

One import name, in floors that import downwards only (``tests/test_architecture.py`` holds the contracts):

* ``miscnet.cli`` — the ``miscnet`` command (top floor; nothing imports it);
* ``miscnet.experiments`` — scenarios, sweeps, metrics, baselines, plots, benchmarks;
* ``miscnet.sender`` / ``miscnet.receiver`` — the edge and the cloud (neither imports the other);
* ``miscnet.channel`` — links, transport, the relay node;
* ``miscnet.core`` — the layer format both ends share: container, layer codecs, errors, image I/O, configs;
* ``miscnet.v1`` — generated protobuf code (from ``proto/miscnet/v1/*.proto``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("miscnet")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
