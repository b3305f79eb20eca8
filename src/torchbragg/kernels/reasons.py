"""The structure-factor lookup reasons: the one table of their codes and names.

Every per-evaluation result (:class:`~torchbragg.kernels.eager.BlockResult`),
fallback map (:class:`~torchbragg.FallbackMap`), pixel tap and the inspector
name a lookup by these codes and names.
"""

from __future__ import annotations

__all__ = ["LOOKUP_REASONS", "LOOKUP_CODES", "FALLBACK_REASONS", "LOOKUP_DESCRIPTIONS"]

#: code -> name of how one evaluation got its structure factor
LOOKUP_REASONS = {
    0: "table",
    1: "default_F:no_table",
    2: "default_F:outside_table",
    3: "default_F:unlisted",
    4: "interpolated",
}
#: name -> code
LOOKUP_CODES = {name: code for code, name in LOOKUP_REASONS.items()}
#: the codes a fallback map's ``reason`` holds (a pixel's dominant reason; 0: no fallback)
FALLBACK_REASONS = {code: name for code, name in LOOKUP_REASONS.items() if code <= 3}
#: name -> what it means, in words (tap summaries, the inspector's readout and legend)
LOOKUP_DESCRIPTIONS = {
    "table": "taken from the HKL table",
    "default_F:no_table": "no HKL table loaded",
    "default_F:outside_table": "(h0,k0,l0) outside the table's box",
    "default_F:unlisted": "inside the table's box but not listed in the file",
    "interpolated": "interpolated from the table",
}
