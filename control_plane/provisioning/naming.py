"""Deterministic names for silo resources, derived from the tenant slug only.

Determinism is what makes provisioning idempotent: a retried ``provision``
(after a crash at any point) computes the same names and so finds what the
previous attempt created instead of creating a second copy.

Catalog slugs match ``^[a-z0-9][a-z0-9-]{1,62}$``. Some targets are stricter:
PostgreSQL identifiers stop at 63 bytes, and RDS identifiers must start with a
letter, may not contain ``--`` nor end with ``-``. When a slug does not fit as
is, the name keeps a readable prefix and ends with a short hash of the full
slug, so it stays unique and stable.
"""

from __future__ import annotations

import hashlib
import re

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
PG_IDENTIFIER_MAX = 63
RDS_IDENTIFIER_MAX = 63
_RDS_OK = re.compile(r"^[a-z](?!.*--)[a-z0-9-]*[a-z0-9]$")


def _check(slug: str) -> None:
    if not SLUG_RE.match(slug):
        raise ValueError(f"not a tenant slug: {slug!r} (expected {SLUG_RE.pattern})")


def _digest(slug: str) -> str:
    return hashlib.sha256(slug.encode()).hexdigest()[:8]


def _fit(name: str, slug: str, limit: int, sep: str) -> str:
    if len(name) <= limit:
        return name
    suffix = f"{sep}{_digest(slug)}"
    return name[: limit - len(suffix)].rstrip("-_") + suffix


def silo_database_name(slug: str) -> str:
    """``silo_<slug with - replaced by _>`` (slugs have no ``_``, so this is injective)."""
    _check(slug)
    return _fit(f"silo_{slug.replace('-', '_')}", slug, PG_IDENTIFIER_MAX, "_")


def silo_stack_name(slug: str) -> str:
    """The Pulumi stack of a silo: ``silo-<slug>``."""
    _check(slug)
    return f"silo-{slug}"


def silo_resource_identifier(slug: str) -> str:
    """An RDS/KMS-safe identifier: ``silo-<slug>``, hashed when the slug breaks RDS rules."""
    _check(slug)
    name = f"silo-{slug}"
    if len(name) <= RDS_IDENTIFIER_MAX and _RDS_OK.match(name):
        return name
    cleaned = re.sub(r"-{2,}", "-", name).rstrip("-")
    return _fit(f"{cleaned}-{_digest(slug)}", slug, RDS_IDENTIFIER_MAX, "-")
