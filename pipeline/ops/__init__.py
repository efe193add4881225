"""The operations behind the CLI commands, one module each (the Python API's top level).

Each reads: open the store, make the plan (:mod:`pipeline.plan`), build the graph
(:mod:`pipeline.graph`), run it on a runtime (:mod:`pipeline.runtime`), commit (through
:mod:`pipeline.store`). These functions open runtimes and decide when to compute; everything
below them only builds.
"""
