"""GPU facts, detection and plan selection (no CUDA work at import)."""
from .device import DeviceInfo, device_from_arch
from .detect import detect, forced_arch, forced_path
from .plan import PATH_NAMES, Plan, Problem, all_specs_for, select_plan
from .table import ARCH_TABLE, GATE_CCS, KNOWN_CCS, ArchFacts, facts_for, parse_arch

__all__ = [
    "ARCH_TABLE", "GATE_CCS", "KNOWN_CCS", "ArchFacts", "DeviceInfo", "PATH_NAMES", "Plan",
    "Problem", "all_specs_for", "detect", "device_from_arch", "facts_for", "forced_arch",
    "forced_path",
    "parse_arch", "select_plan",
]
