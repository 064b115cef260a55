"""sigscale.slurm"""
