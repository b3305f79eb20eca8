"""File formats: SMV images (:mod:`.smv`), PGM previews (:mod:`.pgm`), HKL tables and Fdump.bin
(:mod:`.hkl_table`), MOSFLM matrices (:mod:`.matrix_file`), images for comparison
(:mod:`.images`) and atomic writes (:mod:`.atomic_io`)."""

__all__: list[str] = []
