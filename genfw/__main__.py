"""``python -m genfw`` (and ``torchrun -m genfw``) runs the CLI."""

from genfw.cli import main

main()
