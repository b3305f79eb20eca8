"""The command lines: ``torchbragg`` (:mod:`.command`, with its ``compare``, ``bench`` and
``defaultf-map`` subcommands in :mod:`.compare`, :mod:`.bench` and :mod:`.defaultf_map`) and
``bragg-tap`` (:mod:`.tap`)."""

__all__: list[str] = []
