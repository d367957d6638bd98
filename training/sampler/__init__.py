"""The tissue-aware multi-crop sampler: crop boxes, iBOT patch masks and augmentation."""
