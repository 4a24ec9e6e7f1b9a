"""Capacity planning for the big night: how many edges, origin and admission nodes, how much
Redis and bandwidth a space of N listeners needs, from the figures the benchmarks measured here
(``inputs``), the fleet arithmetic (``capacity``), a discrete-event simulation of the 8 PM join
storm (``storm``), both together (``planner``), the printed plan (``report``), the PNG (``plot``)
and the ``townhall plan`` command's file handling (``command``). Everything but ``plot`` and
``command`` is pure."""
