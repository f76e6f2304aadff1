"""Data that ships with a package, written out for image pipelines."""
from .digits import digits_tensors, write_digits_imagefolder

__all__ = ["digits_tensors", "write_digits_imagefolder"]
