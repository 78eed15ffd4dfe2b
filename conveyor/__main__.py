"""``python -m conveyor``: the ``conveyor`` command."""

from conveyor.cli import entry

entry()
