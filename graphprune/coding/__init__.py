"""Stage 7: Deep-Compression coding (``encode``/``decode``)."""

from .codec import CodingError, EncodeReport, decode, encode

__all__ = ["CodingError", "EncodeReport", "decode", "encode"]
