"""``townhall loadtest``: bounded load against a node on loopback, with a report and a plot.

Pure parts take ``now`` and touch no socket: ``loopback`` (which targets and source addresses
are allowed), ``schedule`` (when each simulated client starts), ``accounting`` (percentiles,
time buckets, the join ledger and its honesty checks, the ``/metrics`` reader) and ``progress``
(the progress line). ``runner`` is the asyncio/httpx edge that drives the scenarios;
``plot`` draws the PNG.
"""
