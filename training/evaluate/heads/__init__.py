"""Task heads on a frozen or fine-tuned encoder: the shared epoch loop, classifiers and the lesion
heatmap."""
