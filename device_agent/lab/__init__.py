"""The bench, not the bedside: the board simulator, the WFDB reader and writer, the demo.

The service never imports this package; the commands `simulate`, `demo`, `measure` and
`export` and the tests do.
"""
