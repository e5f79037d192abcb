"""The ``miscnet`` command line: parses options into typed configs and calls the floors below."""
