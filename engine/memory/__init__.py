"""Memory: the training peak predicted before the first step (estimate.py, per-family data in
families.py), whether it fits the device and which setting makes it fit (advice.py), for a config and
dataset or a loaded run (run.py)."""

from .advice import Advice, advise, alternatives, free_memory
from .estimate import Estimate, RunShape, Weights, estimate, weights_of_family, weights_of_model
from .families import MEMORY, FamilyMemory, family_memory

__all__ = ["Advice", "Estimate", "FamilyMemory", "MEMORY", "RunShape", "Weights", "advise", "alternatives",
           "estimate", "family_memory", "free_memory", "weights_of_family", "weights_of_model"]
