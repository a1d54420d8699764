"""The service's benchmark: ``python -m tools.bench`` (``make bench``). A developer tool: not
part of the installed package or the Bento.

It measures the same things, the same way, as the peer-server benchmark (``peers-bench``, see
the README's benchmark section) so the numbers compare: the raw in-process ONNX Runtime ceiling
of the reference model (the peers' ResNet-style CNN), the served model under a closed-loop
``wrk`` pinned to CPU 1 at concurrency 1/16/64, the request path's floor (``CLF_RUNTIME=noop``), where the
server's CPU goes per request, and the trained default model; then the same for the text model
on a short/long length mix; what the prediction log costs (log on vs off); and the overload
cell (1,000 connections: every request answered 200 or 503 within 2 s, the accepted ones within
the bound the settings imply, memory flat, normal service right after). Foreign CPU on the
shared box is recorded per cell and contaminated cells are flagged.

Modules: ``config`` (options, machine facts), ``store`` (the models), ``bodies`` (request
bodies), ``textmix`` (the text length mix and wrk's rotating bodies), ``raw`` and ``textraw``
(the ceilings), ``server`` (start/stop/scrape one ``bentoml serve``), ``cpu`` (CPU accounting
from /proc), ``wrk`` (the load generator and its output), ``prometheus`` (metric deltas),
``predlog`` (the prediction log's file and rows), ``cells`` (served measurements), ``report``
(tables, CPU breakdown), ``sections`` (one part of the run each), ``image``, ``text`` and
``overload`` (the three tasks; ``overload.lua`` times its answers by status), ``__main__`` (the run, the summary, the JSON).
Tools of their own beside it: ``compare`` (two source trees, interleaved), ``logpair`` (the
prediction log's cost from a log-off and a log-on server side by side) and ``logwrite`` (the
log's write path alone).
"""
