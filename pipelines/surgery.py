"""The clinical vocabulary of laparoscopic cholecystectomy, in one place.

Phase names, anatomy classes and the real Cholec80 statistics are used by the synthetic
generator, the phase filter and the reports; keeping them here means a phase is never
spelled twice. Figures come from the 80 Cholec80 videos (1 fps labels), as tabulated in
``shared/data/real/README.md``; they are copied here because the agent must work on a box
that has no copy of the datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

PHASES: tuple[str, ...] = (
    "Preparation",
    "CalotTriangleDissection",
    "ClippingCutting",
    "GallbladderDissection",
    "GallbladderPackaging",
    "CleaningCoagulation",
    "GallbladderRetraction",
)
PHASE_ID = MappingProxyType({name: i for i, name in enumerate(PHASES)})

#: Cholec80 tool names, in the column order of the official tool annotation files.
TOOLS: tuple[str, ...] = (
    "Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag",
)

#: CholecSeg8k classes: (id, name, display colour as RGB).
ANATOMY_CLASSES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (0, "Black Background", (0, 0, 0)),
    (1, "Abdominal Wall", (210, 140, 140)),
    (2, "Liver", (255, 114, 114)),
    (3, "Gastrointestinal Tract", (231, 70, 156)),
    (4, "Fat", (186, 183, 75)),
    (5, "Grasper", (170, 255, 0)),
    (6, "Connective Tissue", (255, 85, 0)),
    (7, "Blood", (255, 0, 0)),
    (8, "Cystic Duct", (255, 255, 0)),
    (9, "L-hook Electrocautery", (169, 255, 184)),
    (10, "Gallbladder", (255, 160, 165)),
    (11, "Hepatic Vein", (0, 50, 128)),
    (12, "Liver Ligament", (111, 74, 0)),
)
ANATOMY_NAMES: tuple[str, ...] = tuple(name for _, name, _ in ANATOMY_CLASSES)


class Anatomy:
    """Class ids by name, so code says ``Anatomy.CYSTIC_DUCT`` rather than ``8``."""

    BACKGROUND = 0
    ABDOMINAL_WALL = 1
    LIVER = 2
    GI_TRACT = 3
    FAT = 4
    GRASPER = 5
    CONNECTIVE_TISSUE = 6
    BLOOD = 7
    CYSTIC_DUCT = 8
    L_HOOK = 9
    GALLBLADDER = 10
    HEPATIC_VEIN = 11
    LIVER_LIGAMENT = 12


@dataclass(frozen=True)
class PhaseDurationStats:
    """Duration of one phase over the Cholec80 videos, in seconds."""

    videos_with_phase: int
    median_s: float
    p90_s: float
    max_s: float


CHOLEC80_VIDEOS = 80
PHASE_DURATIONS = MappingProxyType({
    "Preparation": PhaseDurationStats(71, 97, 238, 481),
    "CalotTriangleDissection": PhaseDurationStats(80, 826, 1549, 4409),
    "ClippingCutting": PhaseDurationStats(80, 131, 328, 674),
    "GallbladderDissection": PhaseDurationStats(80, 584, 1326, 3129),
    "GallbladderPackaging": PhaseDurationStats(80, 81, 155, 292),
    "CleaningCoagulation": PhaseDurationStats(74, 130, 439, 595),
    "GallbladderRetraction": PhaseDurationStats(80, 63, 138, 570),
})

#: Transitions seen in Cholec80, with the number of videos that show each.
PHASE_TRANSITIONS = MappingProxyType({
    ("Preparation", "CalotTriangleDissection"): 71,
    ("CalotTriangleDissection", "ClippingCutting"): 80,
    ("ClippingCutting", "GallbladderDissection"): 80,
    ("GallbladderDissection", "GallbladderPackaging"): 68,
    ("GallbladderPackaging", "CleaningCoagulation"): 59,
    ("CleaningCoagulation", "GallbladderRetraction"): 59,
    ("GallbladderPackaging", "GallbladderRetraction"): 21,
    ("GallbladderDissection", "CleaningCoagulation"): 12,
    ("CleaningCoagulation", "GallbladderPackaging"): 12,
    ("GallbladderRetraction", "CleaningCoagulation"): 3,
})
