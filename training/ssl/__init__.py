"""Self-supervised pretraining: networks, losses, schedules, the data pipeline and its cache, the
training loop (single process or torchrun) and its presets."""
