"""`python -m autotm_py ...` runs the `autotm` command (where the console script is not installed)."""

from .cli import main

main()
