"""`python -m rigplan` runs the same CLI as the `rigplan` console script."""

from rigplan.cli import main

main()
