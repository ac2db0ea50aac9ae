"""``python -m trainer``: the same as the ``trainer`` console script."""

from trainer.cli import main

main()
