"""The layer format both ends share: container, layer codecs, errors, image I/O, typed configuration."""
