"""``python -m node`` runs the ``depot-node`` command."""

from node.cli import main

main()
