"""Allow ``python -m qanafed``."""

from qanafed.cli import main

main()
