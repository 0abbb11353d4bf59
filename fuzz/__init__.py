"""Hostile-peer fuzzers for chmig, kept beside the package (as h11 keeps its fuzzer).

* :mod:`fuzz.wire` — the migration wire: a recorded real migration, replayed mutated from a raw socket
  against a real ``chmig receive`` process and an in-process :class:`chmig.receive.Receiver`.
* :mod:`fuzz.api` — the API socket (written separately; optional).

Run ``python -m fuzz --cases N --seed S`` (``make fuzz``); ``python -m fuzz --help`` lists the options.
"""
