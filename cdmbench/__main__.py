"""`python -m cdmbench`: the same program as the `cdmbench` command."""

from cdmbench.cli import main

main()
