"""``python -m conveyor.cli``: the ``conveyor`` command."""

from conveyor.cli import entry

entry()
