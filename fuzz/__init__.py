"""Hostile-peer fuzzers for chmig, kept beside the package (as h11 keeps its fuzzer).

* :mod:`fuzz.wire` — the migration wire: a recorded real migration, replayed mutated from a raw socket
  against a real ``chmig receive`` process and an in-process :class:`chmig.receive.Receiver`.
* :mod:`fuzz.api` — the API socket: malformed HTTP, hostile JSON bodies for every route (migrations,
  snapshot and restore), slow and idle clients, against a running VMM and an empty one.
* :mod:`fuzz.pagefault` — the source's PageFault server, asked for hostile ranges by a raw destination.
* :mod:`fuzz.pager` — the destination's postcopy pager, answered by a hostile source.
* :mod:`fuzz.offload` — the offload daemon: a hostile VMM against its snapshot side, a hostile receiver
  against its on-demand restore's page serving.

Run ``python -m fuzz --cases N --seed S`` (``make fuzz``); ``python -m fuzz --help`` lists the options.
"""
