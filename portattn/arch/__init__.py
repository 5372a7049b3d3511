"""GPU facts, detection and plan selection (no CUDA work at import)."""
from .device import DeviceInfo, device_from_arch
from .detect import detect, forced_arch, forced_path
from .plan_decode import DecodePlan, DecodeProblem, all_decode_specs_for, select_decode_plan
from .plan import PATH_NAMES, Plan, Problem, all_specs_for, select_plan
from .plan_bwd import BwdPlan, all_bwd_specs_for, select_bwd_plan
from .table import ARCH_TABLE, GATE_CCS, KNOWN_CCS, ArchFacts, facts_for, parse_arch

__all__ = [
    "ARCH_TABLE", "BwdPlan", "GATE_CCS", "KNOWN_CCS", "ArchFacts", "DeviceInfo", "PATH_NAMES",
    "Plan", "all_bwd_specs_for", "select_bwd_plan",
    "Problem", "all_specs_for", "detect", "device_from_arch", "facts_for", "forced_arch",
    "forced_path",
    "DecodePlan", "DecodeProblem", "all_decode_specs_for", "parse_arch", "select_decode_plan", "select_plan",
]
