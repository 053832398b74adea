"""Past one machine: ``cdmbench launch`` submits a recipe's stages, its sampling and its evaluation as
jobs through submitit (SLURM, or processes of this machine), and ``cdmbench status`` reads where a
run stands from its directory ([docs/cluster.md](../../docs/cluster.md))."""
