"""Hardware facts per compute capability: the single table plans, checks and messages read.

Sources: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"
and the feature tables; PTX ISA (mma / ldmatrix / cp.async target requirements).
At run time the device's own attributes win over the table (see ``detect``); the table
is what plans use when an arch is forced (``PORTATTN_ARCH``) or printed with no GPU.

Compute capabilities are integers: major * 10 + minor (7.5 -> 75).
"""
from __future__ import annotations

from dataclasses import dataclass

KB = 1024

# Tensor-core MMA shapes, ordered: each level's kernels need at least that instruction.
MMA_NONE = 0
MMA_M8N8K4 = 1     # Volta: quad-pair fragments
MMA_M16N8K8 = 2    # Turing
MMA_M16N8K16 = 3   # Ampere and newer (also bf16)
MMA_NAMES = {
    MMA_NONE: "none",
    MMA_M8N8K4: "mma.m8n8k4",
    MMA_M16N8K8: "mma.m16n8k8",
    MMA_M16N8K16: "mma.m16n8k16",
}


@dataclass(frozen=True)
class ArchFacts:
    cc: int
    example: str
    smem_per_sm: int
    smem_per_block: int          # without opting in
    smem_per_block_optin: int    # the most one block may request
    regs_per_sm: int
    max_regs_per_thread: int
    max_threads_per_sm: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    max_threads_per_block: int
    mma: int
    ldmatrix: bool
    cp_async: bool
    bf16_mma: bool
    smem_reserved_per_block: int  # taken by the system from the SM's pool per resident CTA

    @property
    def name(self) -> str:
        return f"sm_{self.cc}"

    @property
    def mma_name(self) -> str:
        return MMA_NAMES[self.mma]


def _facts(cc, example, smem_sm_kb, smem_optin_kb, threads_sm, ctas_sm, mma,
           ldmatrix=False, cp_async=False, bf16=False):
    return ArchFacts(
        cc=cc, example=example,
        smem_per_sm=smem_sm_kb * KB,
        smem_per_block=48 * KB,
        smem_per_block_optin=smem_optin_kb * KB,
        regs_per_sm=64 * KB,
        max_regs_per_thread=255,
        max_threads_per_sm=threads_sm,
        max_warps_per_sm=threads_sm // 32,
        max_ctas_per_sm=ctas_sm,
        max_threads_per_block=1024,
        mma=mma, ldmatrix=ldmatrix, cp_async=cp_async, bf16_mma=bf16,
        smem_reserved_per_block=KB if cc >= 80 else 0,
    )


# Maxwell/Pascal allow 48 KB per block even where the SM has 96 KB (copies that claim
# 64 KB per block there are wrong). Turing halves threads per SM; 8.6/8.9 cap at 1536.
ARCH_TABLE: dict[int, ArchFacts] = {f.cc: f for f in (
    _facts(50, "GTX 750 Ti", 64, 48, 2048, 32, MMA_NONE),
    _facts(52, "GTX 980 / M40", 96, 48, 2048, 32, MMA_NONE),
    _facts(53, "Jetson TX1", 64, 48, 2048, 32, MMA_NONE),
    _facts(60, "P100", 64, 48, 2048, 32, MMA_NONE),
    _facts(61, "GTX 1080 Ti / P40", 96, 48, 2048, 32, MMA_NONE),
    _facts(62, "Jetson TX2", 64, 48, 2048, 32, MMA_NONE),
    _facts(70, "V100", 96, 96, 2048, 32, MMA_M8N8K4),
    _facts(72, "Jetson Xavier", 96, 96, 2048, 32, MMA_M8N8K4),
    _facts(75, "T4 / RTX 2080 Ti", 64, 64, 1024, 16, MMA_M16N8K8, ldmatrix=True),
    _facts(80, "A100", 164, 163, 2048, 32, MMA_M16N8K16, True, True, True),
    _facts(86, "RTX 3090 / A10", 100, 99, 1536, 16, MMA_M16N8K16, True, True, True),
    _facts(87, "Jetson Orin", 164, 163, 1536, 16, MMA_M16N8K16, True, True, True),
    _facts(89, "RTX 4090 / L4", 100, 99, 1536, 24, MMA_M16N8K16, True, True, True),
    _facts(90, "H100", 228, 227, 2048, 32, MMA_M16N8K16, True, True, True),
)}

KNOWN_CCS = tuple(sorted(ARCH_TABLE))
OLDEST_CC = KNOWN_CCS[0]
NEWEST_CC = KNOWN_CCS[-1]
# The archs the compile gate must cover (one per distinct SASS family users own).
GATE_CCS = (50, 52, 60, 61, 70, 75, 80, 86, 89, 90)


def facts_for(cc: int) -> ArchFacts:
    """Facts for ``cc``; an arch newer than the table is planned as the newest known one."""
    if cc in ARCH_TABLE:
        return ARCH_TABLE[cc]
    if cc > NEWEST_CC:
        return ARCH_TABLE[NEWEST_CC]
    if cc < OLDEST_CC:
        raise ValueError(
            f"compute capability {cc // 10}.{cc % 10} is older than the oldest supported "
            f"({OLDEST_CC // 10}.{OLDEST_CC % 10}, Maxwell)")
    # An unlisted minor version inside a known major (e.g. 7.3): the nearest lower entry.
    lower = [c for c in KNOWN_CCS if c < cc]
    return ARCH_TABLE[lower[-1]]


def parse_arch(text: str, *, source: str = "arch") -> int:
    """Parse 'sm_75', 'sm75', '75' or '7.5' into 75; ValueError naming ``source`` otherwise."""
    t = str(text).strip().lower()
    if not t.isascii():
        t = ""  # str.isdigit accepts superscripts that int() rejects
    if t.startswith("sm_"):
        t = t[3:]
    elif t.startswith("sm"):
        t = t[2:]
    if "." in t:
        major, _, minor = t.partition(".")
        ok = major.isdigit() and minor.isdigit() and len(minor) == 1
        cc = int(major) * 10 + int(minor) if ok else None
    else:
        cc = int(t) if t.isdigit() and len(t) >= 2 else None
    if cc is None:
        raise ValueError(f"{source} must look like 'sm_75' or '7.5', got {text!r}")
    if cc < OLDEST_CC:
        raise ValueError(f"{source} must be sm_{OLDEST_CC} or newer, got {text!r}")
    return cc
