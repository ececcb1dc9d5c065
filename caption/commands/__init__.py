"""The ``caption`` command line: thin layers that parse arguments, call the library and report.

Nothing in the library imports from here; ``caption.commands.main:main`` is the console script.
"""
