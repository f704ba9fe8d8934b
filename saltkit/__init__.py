"""saltkit: salt body segmentation in TGS seismic tiles with MONAI and Ignite."""

from saltkit.errors import install_excepthook

__version__ = "0.1.0"

# Uncaught saltkit errors (a bad config key, a missing file) end the program with their one-line message, exit 2.
install_excepthook()
