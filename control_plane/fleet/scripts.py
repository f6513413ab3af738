"""The tenant stream's script directory as the fleet runner sees it.

The runner needs three things from Alembic's script directory, computed once
per run in the parent process (no migration context is opened for them):
the linear order of revisions, the head, and how a database's revision relates
to them (drift). The fleet requires a *linear* tenant history: one head, no
merge points. Every database of the fleet must follow the same path, so a
branch in the tenant stream is an error to fix before a fleet run.

"Ahead of head" cannot be derived from a revision the code does not know; it is
inferred from the stream's naming convention ``<prefix>_<NNNN>`` (for example
``tenant_0007``): an unknown revision with the head's prefix and a larger number
was written by newer code. Any other unknown revision is reported as unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from alembic.script import ScriptDirectory

from control_plane import schema
from data_plane.exceptions import InvalidInputError

_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)$")
_RELATIVE = re.compile(r"^[+-]\d+$")


class Drift(StrEnum):
    AT_HEAD = "at-head"
    BEHIND = "behind"
    AHEAD = "ahead"
    UNVERSIONED = "unversioned"
    UNKNOWN = "unknown-revision"
    UNREACHABLE = "unreachable"


class RevisionError(InvalidInputError):
    """The requested revision cannot be reached from this database's revision."""

    code = "invalid_revision"


def default_location() -> str:
    return str(schema.MIGRATIONS_DIR / schema.Stream.TENANT.value)


@dataclass(frozen=True)
class ScriptInfo:
    """Linear revision order (base first) of one tenant script directory."""

    location: str
    order: tuple[str, ...]

    @classmethod
    def load(cls, location: str | Path | None = None) -> ScriptInfo:
        loc = str(location) if location is not None else default_location()
        cfg = schema.alembic_config(schema.Stream.TENANT)
        cfg.set_main_option("script_location", loc)
        script = ScriptDirectory.from_config(cfg)
        heads = script.get_heads()
        if len(heads) != 1:
            raise InvalidInputError(f"the tenant stream in {loc} has {len(heads)} heads; merge them before a fleet run")
        newest_first = []
        for rev in script.walk_revisions():
            if isinstance(rev.down_revision, tuple | list):
                raise InvalidInputError(
                    f"revision {rev.revision} in {loc} merges branches; the fleet runner needs a linear history"
                )
            newest_first.append(rev.revision)
        return cls(location=loc, order=tuple(reversed(newest_first)))

    @property
    def head(self) -> str | None:
        return self.order[-1] if self.order else None

    def index(self, revision: str | None) -> int:
        """Position in the history; -1 is base (unversioned or empty version table)."""
        if revision is None:
            return -1
        return self.order.index(revision)

    def knows(self, revision: str | None) -> bool:
        return revision is None or revision in self.order

    def classify(self, revision: str | None) -> Drift:
        if revision is None:
            return Drift.UNVERSIONED
        if revision == self.head:
            return Drift.AT_HEAD
        if revision in self.order:
            return Drift.BEHIND
        return Drift.AHEAD if self._looks_newer(revision) else Drift.UNKNOWN

    def behind_by(self, revision: str | None) -> int | None:
        if not self.knows(revision):
            return None
        return len(self.order) - 1 - self.index(revision)

    def _looks_newer(self, revision: str) -> bool:
        head = self.head
        ours = _NUMBERED.match(head) if head else None
        theirs = _NUMBERED.match(revision)
        if ours is None or theirs is None or ours["prefix"] != theirs["prefix"]:
            return False
        return int(theirs["number"]) > int(ours["number"])

    @staticmethod
    def is_relative(spec: str) -> bool:
        return bool(_RELATIVE.match(spec))

    def absolute(self, spec: str) -> str | None:
        """Resolve ``head``, ``base`` or a (unique prefix of a) revision id; None is base."""
        if spec == "head":
            return self.head
        if spec == "base":
            return None
        if spec in self.order:
            return spec
        matches = [rev for rev in self.order if rev.startswith(spec)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RevisionError(f"unknown revision {spec!r} (known: {', '.join(self.order) or 'none'})")
        raise RevisionError(f"revision prefix {spec!r} is ambiguous: {', '.join(matches)}")

    def destination(self, spec: str, current: str | None, *, upgrade: bool) -> str | None:
        """Where ``upgrade``/``downgrade`` ``spec`` takes a database now at ``current``.

        Raises :class:`RevisionError` when that move is impossible for this
        database (unknown current revision, relative step past base or head,
        upgrade to an older revision or downgrade to a newer one).
        """
        if not self.knows(current):
            raise RevisionError(
                f"database is at revision {current!r}, unknown to this code "
                f"({self.classify(current).value}); refusing to migrate it"
            )
        here = self.index(current)
        if self.is_relative(spec):
            there = here + int(spec)
            if not -1 <= there < len(self.order):
                raise RevisionError(f"cannot move {spec} steps from {current or 'base'}")
        else:
            there = self.index(self.absolute(spec))
        if upgrade and there < here:
            raise RevisionError(f"database is at {current}, newer than the requested revision; use downgrade")
        if not upgrade and there > here:
            raise RevisionError(f"database is at {current or 'base'}, older than the requested revision")
        return None if there == -1 else self.order[there]
