"""`python -m empower` (also `accelerate launch -m empower ...`)."""

from empower.cli import main

main()
