"""The operations behind the CLI commands, one module each (the Python API's top level).

These functions open runtimes and decide when to compute; everything below them only builds.
"""
