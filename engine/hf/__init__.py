"""The seam with transformers: the registered attention and mask functions, our Cache, model
loading, and the version-dependent calls (all in ``integration.py``)."""
