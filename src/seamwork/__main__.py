"""``python -m seamwork``: the ``seamwork`` command without its script."""

from seamwork.cli._app import main

main()
