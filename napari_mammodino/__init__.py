"""napari-mammodino."""
