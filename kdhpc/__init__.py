"""kdhpc: knowledge distillation of MRI networks, from a laptop CPU to a SLURM cluster."""

__version__ = "0.1.0"
