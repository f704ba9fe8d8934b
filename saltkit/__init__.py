"""saltkit: salt body segmentation in TGS seismic tiles with MONAI and Ignite."""

__version__ = "0.1.0"
