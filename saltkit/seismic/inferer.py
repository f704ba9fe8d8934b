"""Temporary: the section inferer of saltkit.inference once it exists, else the stand-in."""

try:
    from saltkit.inference import section_inferer
except ImportError:
    from saltkit.seismic._standin_inferer import section_inferer

__all__ = ["section_inferer"]
