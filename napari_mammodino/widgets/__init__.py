"""The dock widgets: thin views that call the core through ``napari_mammodino._workers``."""
