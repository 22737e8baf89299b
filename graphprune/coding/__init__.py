"""Stage 7: Deep-Compression coding (``encode``/``decode``).

``codec`` turns tensors into coded segments and back, ``container`` lays out and checks the
file, ``huffman`` and ``bits`` pack the codes.
"""

from .codec import CodingError, EncodeReport, decode, encode

__all__ = ["CodingError", "EncodeReport", "decode", "encode"]
