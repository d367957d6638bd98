"""Using a trained encoder: load it, extract features, probe, retrieve, infer maps, export them, and
train task heads on top."""
