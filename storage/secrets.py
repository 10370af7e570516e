"""Secrets: device passwords and API keys. Only hashes are ever stored.

* Device secrets are checked against an Argon2id hash (slow and salted: a stolen database
  does not give away meters' passwords). Hashing costs ~20 ms of CPU, so callers run it in
  a worker thread (see ``node.auth``), never on the event loop.
* API keys are 256-bit random tokens; a SHA-256 digest is enough to store them (nobody can
  brute-force 2**256), and it keeps every API request cheap. The key carries its own id so
  the lookup is one indexed read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP's minimum for Argon2id: 19 MiB, 2 iterations, 1 lane. Higher memory costs
# would make a reconnect storm of a thousand meters a memory storm too.
_HASHER: Final = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

API_KEY_PREFIX: Final = "dnk"
ROLES: Final = ("admin", "operator", "viewer")


def new_device_secret() -> str:
    return secrets.token_urlsafe(24)


def hash_device_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def verify_device_secret(secret_hash: str, secret: str) -> bool:
    try:
        return _HASHER.verify(secret_hash, secret)
    except (VerificationError, InvalidHashError):
        return False


def new_api_key() -> tuple[str, str, str]:
    """A new key as ``(key_id, full_key, key_hash)``; show *full_key* once, store the hash."""
    key_id = secrets.token_hex(6)
    full = f"{API_KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return key_id, full, hash_api_key(full)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_key(key: str) -> str | None:
    """The key id inside *key*, or None when it is not shaped like one of ours."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or len(parts[1]) != 12:  # noqa: PLR2004
        return None
    return parts[1]


def api_key_matches(key: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_api_key(key), key_hash)
