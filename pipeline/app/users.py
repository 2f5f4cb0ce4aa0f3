"""Users of the app: names, roles and salted password hashes.

Passwords are hashed with scrypt (standard library; memory-hard, so guessing on a GPU is slow) with a
random 16-byte salt per user, and compared in constant time. The parameters are stored with each hash,
so they can be raised later without invalidating existing passwords. Checking a login costs about
50 ms; the app runs it off the server's event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from pipeline.app.db import LabelDB, LabelError

ROLES = ("annotator", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_LENGTH = 8
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$n$r$p$salt$hash`, hex-encoded; a fresh random salt unless one is given."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    """Whether `password` hashes to `stored`, compared in constant time."""
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise LabelError(f"unknown password hash scheme {scheme!r}")
    candidate = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem: n * r * 128 bytes of work memory (16 MiB here), plus headroom OpenSSL asks for.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=64 * 2**20, dklen=32)


# A hash of a random password, checked against when the user does not exist, so a login takes as long
# for an unknown name as for a wrong password and does not reveal which names exist.
_DECOY = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'00' * 16}${'00' * 32}"


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise LabelError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")


def add_user(db: LabelDB, name: str, role: str, password: str) -> User:
    if not USER_NAME.match(name):
        raise LabelError(
            f"invalid user name {name!r}: up to 64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit"
        )
    if role not in ROLES:
        raise LabelError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    check_new_password(password)
    password_hash = hash_password(password)  # slow: outside the write transaction
    with db.write() as conn:
        if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise LabelError(
                f"user {name!r} exists already; `rlhf label users passwd {name}` sets a new password"
            )
        conn.execute("INSERT INTO users VALUES (?, ?, ?, ?)", (name, role, password_hash, time.time()))
    return User(name, role)


def set_password(db: LabelDB, name: str, password: str) -> None:
    check_new_password(password)
    password_hash = hash_password(password)
    with db.write() as conn:
        if (
            conn.execute("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name)).rowcount
            == 0
        ):
            raise LabelError(f"no user {name!r}; `rlhf label users ls` lists them")


def get_user(db: LabelDB, name: str | None) -> User | None:
    if not name:
        return None
    with db.read() as conn:
        row = conn.execute("SELECT name, role FROM users WHERE name = ?", (name,)).fetchone()
    return None if row is None else User(row["name"], row["role"])


def list_users(db: LabelDB) -> list[User]:
    with db.read() as conn:
        rows = conn.execute("SELECT name, role FROM users ORDER BY name").fetchall()
    return [User(row["name"], row["role"]) for row in rows]


def verify_login(db: LabelDB, name: str, password: str) -> bool:
    with db.read() as conn:
        row = conn.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
    matches = password_matches(password, row["password_hash"] if row else _DECOY)
    return row is not None and matches
