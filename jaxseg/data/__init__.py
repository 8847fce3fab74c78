"""Data sources, splits, preprocessing, augmentation and two-stream batches."""

from jaxseg.data.base import Case, DataError, check_case

__all__ = ["Case", "DataError", "check_case"]
