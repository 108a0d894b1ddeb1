"""Calibration of the learned completion maps: distillation on the model's own activations
(fit.py) and the maps' file format (maps_file.py)."""
