"""The spec's size budget: every artifact must fit in it."""

from __future__ import annotations

from appliance.errors import ApplianceError
from appliance.manifest import Artifact

MB = 1_000_000


class BudgetError(ApplianceError):
    """One or more artifacts are larger than the spec's size_budget_mb."""

    def __init__(self, over: list[Artifact], budget_mb: int) -> None:
        self.over = over
        self.budget_mb = budget_mb
        figures = ", ".join(f"{a.file} is {a.size_bytes / MB:.1f} MB" for a in over)
        super().__init__(f"over the size budget of {budget_mb} MB (size_budget_mb): {figures}")


# A raw disk image's size is its partition layout, mostly holes; the data it
# carries is measured by its compressed twin, NAME.qcow2, which is checked.
EXEMPT_SUFFIXES = (".raw",)


def check_budget(artifacts: tuple[Artifact, ...], budget_mb: int) -> None:
    over = [
        artifact
        for artifact in artifacts
        if artifact.size_bytes > budget_mb * MB and not artifact.file.endswith(EXEMPT_SUFFIXES)
    ]
    if over:
        raise BudgetError(over, budget_mb)
