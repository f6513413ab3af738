"""Placement policy: which kind of store a new tenant of a tier starts in.

The policy is configuration (``TENANTCTL_PLACEMENT_POLICY``, a JSON object such
as ``{"free": "pool", "standard": "pool", "enterprise": "silo"}``); its keys are
the tiers the catalog accepts. It only decides the *initial* placement: changing
a tenant's tier later moves no data (promotion/demotion do, explicitly).
"""

from __future__ import annotations

from enum import StrEnum

from control_plane.settings import ControlPlaneSettings
from data_plane.exceptions import InvalidInputError


class Placement(StrEnum):
    POOL = "pool"
    SILO = "silo"


class PlacementPolicy:
    """Tier -> default placement."""

    def __init__(self, mapping: dict[str, str]) -> None:
        try:
            self._mapping = {tier: Placement(kind) for tier, kind in mapping.items()}
        except ValueError as exc:
            raise ValueError(f"placement policy values must be 'pool' or 'silo': {mapping}") from exc
        if not self._mapping:
            raise ValueError("the placement policy names no tier")

    @classmethod
    def from_settings(cls, settings: ControlPlaneSettings) -> PlacementPolicy:
        return cls(settings.placement_policy)

    @property
    def tiers(self) -> list[str]:
        return sorted(self._mapping)

    def validate_tier(self, tier: str) -> str:
        if tier not in self._mapping:
            raise InvalidInputError(f"unknown tier {tier!r}; known tiers: {', '.join(self.tiers)}")
        return tier

    def placement_for(self, tier: str) -> Placement:
        return self._mapping[self.validate_tier(tier)]
