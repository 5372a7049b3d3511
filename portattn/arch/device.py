"""DeviceInfo: what plans know about the GPU (real, forced, or a table arch with no GPU)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .table import ArchFacts, facts_for


@dataclass(frozen=True)
class DeviceInfo:
    """Limits a plan may use. ``plan_cc`` is the arch plans target (forced through
    ``PORTATTN_ARCH`` or the real one); smem limits are the smaller of that arch's table
    values and the real device's, so a forced plan also fits the GPU it runs on."""
    plan_cc: int
    facts: ArchFacts
    smem_per_block: int
    smem_per_sm: int
    sm_count: int | None = None          # None: no GPU (report --arch)
    name: str = ""
    real_cc: int | None = None           # None: no GPU
    forced: bool = False
    device_id: int | None = None
    versions: dict = field(default_factory=dict, compare=False, hash=False)
    nvrtc_archs: tuple = ()

    @property
    def has_gpu(self) -> bool:
        return self.real_cc is not None

    @property
    def arch_name(self) -> str:
        return f"sm_{self.plan_cc}"

    def describe(self) -> str:
        if not self.has_gpu:
            return f"{self.arch_name} (table facts, no GPU; e.g. {self.facts.example})"
        s = f"{self.name} (sm_{self.real_cc}, {self.sm_count} SMs)"
        if self.forced:
            s += f", planned as {self.arch_name} (PORTATTN_ARCH)"
        return s


def device_from_arch(cc: int) -> DeviceInfo:
    """A GPU-less DeviceInfo for ``cc`` built from the table alone."""
    f = facts_for(cc)
    return DeviceInfo(plan_cc=cc, facts=f, smem_per_block=f.smem_per_block_optin,
                      smem_per_sm=f.smem_per_sm)
