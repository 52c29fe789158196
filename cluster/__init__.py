"""maskpot cluster plumbing: SLURM env → ranks, sbatch rendering. Imports no other maskpot package."""
