"""Stage 2: kernel timings per IO placement and copy bandwidths, through the kernel cache."""

from .cache import CacheError, KernelCache, KernelRow
from .fingerprint import device_fingerprint
from .harness import ReplayError, TimingPolicy
from .model import OptaneModel
from .profile import PRUNE_ABOVE, kernel_masks, profile, profile_signature
from .step import measure_step
from .tiers import TierError, open_slow_tier
from .types import FAST, SLOW, Bandwidths, KernelCost, Profile

__all__ = [
    "FAST", "PRUNE_ABOVE", "SLOW", "Bandwidths", "CacheError", "KernelCache", "KernelCost",
    "KernelRow", "OptaneModel", "Profile", "ReplayError", "TierError", "TimingPolicy",
    "device_fingerprint", "kernel_masks", "measure_step", "open_slow_tier", "profile",
    "profile_signature",
]
