"""``python -m catflap``."""

from catflap.cli import main

main()
