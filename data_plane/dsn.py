"""Small helpers for PostgreSQL connection strings.

DSNs are kept in libpq URL form (``postgresql://user@host/db`` or, for unix
sockets, ``postgresql://user@/db?host=/socket/dir``) everywhere they are stored
or printed; drivers get their own dialect prefix only at the edge.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from sqlalchemy.engine import URL, make_url


def _normalise(dsn: str) -> URL:
    url = make_url(dsn)
    return url.set(drivername="postgresql")


def async_url(dsn: str) -> URL:
    """SQLAlchemy URL for the asyncpg driver."""
    return _normalise(dsn).set(drivername="postgresql+asyncpg")


def sync_url(dsn: str) -> URL:
    """SQLAlchemy URL for the psycopg (v3) driver, used by Alembic and DBOS."""
    return _normalise(dsn).set(drivername="postgresql+psycopg")


def libpq(dsn: str | URL) -> str:
    """Plain libpq URL (what psql, asyncpg.connect and psycopg.connect accept)."""
    url = make_url(dsn) if isinstance(dsn, str) else dsn
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(dsn: str, database: str) -> str:
    return libpq(_normalise(dsn).set(database=database))


def with_user(dsn: str, user: str, password: str | None = None) -> str:
    """The DSN as another user; the old user's password never carries over (URL.set keeps it on None)."""
    return libpq(_normalise(dsn).set(username=user)._replace(password=password))


def without_password(dsn: str) -> str:
    """The DSN with no password at all (for what is stored: checkpoints, catalog rows)."""
    return libpq(_normalise(dsn)._replace(password=None))


def with_password(dsn: str, password: str) -> str:
    return libpq(_normalise(dsn).set(password=password))


def password_of(dsn: str) -> str | None:
    return _normalise(dsn).password


def server_user(dsn: str) -> tuple[str | None, str | None, int | None, str | None]:
    """(host, socket directory, port, user): what identifies a login on a server."""
    url = _normalise(dsn)
    socket = url.query.get("host")
    return url.host, str(socket) if socket is not None else None, url.port, url.username


def database_of(dsn: str) -> str:
    name = _normalise(dsn).database
    if not name:
        raise ValueError(f"DSN names no database: {redact(dsn)}")
    return name


def redact(dsn: str) -> str:
    """The DSN with any password replaced, safe for logs and error text."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{quote(parts.password, safe='')}@", ":***@")
    netloc = netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
