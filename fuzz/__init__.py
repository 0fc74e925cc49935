"""Coverage-guided fuzz targets, one module per parser (see ``fuzz/README.md``).

Every target exposes ``TestOneInput(data: bytes)`` and is importable without
atheris, so ``tests/test_fuzz.py`` replays the seed corpus and every kept
crash through it; ``python -m fuzz.<target>`` runs it under atheris.
"""
