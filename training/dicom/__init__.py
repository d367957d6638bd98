"""Reading mammograms faithfully: lazy DICOM and raster files, their metadata, per-frame functional
groups, display (VOI LUT, MONOCHROME1) and the hanging protocol."""
