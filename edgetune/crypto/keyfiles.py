"""One key file at a time: PEM keys, JSON documents and base64 fields, written atomically, read with clear errors.

``keys.py`` decides what a key folder holds; this module reads and writes its files. Writes go
through a temporary file, fsync and rename, so a reader (or a crash) sees the old file or the new one,
never half of one; private keys are 0600 from the first byte. Every reader raises ``ValueError``
naming the file and what is wrong with it (missing, unreadable, readable by group/others, wrong key
type, bad JSON, duplicate keys, bad base64), so an operator can fix a deployment from the message alone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

# ---------------------------------------------------------------------------------------------
# Writing


def private_pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    """PKCS8 PEM, unencrypted (file mode 0600 protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64(raw: bytes) -> str:
    """Standard base64, as registry.json stores raw public keys."""
    return base64.b64encode(raw).decode("ascii")


def json_bytes(doc: dict[str, Any]) -> bytes:
    """Indented JSON with a final newline."""
    return (json.dumps(doc, indent=2) + "\n").encode()


def make_private_dir(path: Path) -> None:
    """Create ``path`` (not its parents) and make it 0700."""
    path.mkdir(mode=0o700, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for an existing folder.
    os.chmod(path, 0o700)


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data``: temp file (0600 from creation), fsync, chmod ``mode``, rename, fsync dir."""
    # A reader (or a crash) sees the old file or the new one, never half of one. mkstemp creates
    # the file 0600, so a private key is never readable by others, even for a moment.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable (POSIX); Windows cannot open a folder for fsync.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Reading


def read(path: Path) -> bytes:
    """The file's bytes; ``ValueError`` if it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (write the key folder with `edgetune keys`)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None


def load_private(path: Path, key_type: type, what: str) -> Any:
    """An unencrypted PEM private key of ``key_type``; refused if group/others can read the file (as ssh does)."""
    if os.name == "posix":
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ValueError(f"{path}: missing (write the key folder with `edgetune keys`)") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from None
        if mode & 0o077:
            raise ValueError(
                f"{path}: private key is accessible by group/others (mode {mode & 0o777:04o}); run `chmod 600 {path}`"
            )
    data = read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # TypeError: the file is encrypted with a passphrase, which edgetune does not support.
        raise ValueError(f"{path}: not {what} in unencrypted PEM ({e})") from None
    if not isinstance(key, key_type):
        raise ValueError(f"{path}: holds a {type(key).__name__}, expected {what}")
    return key


def load_public(path: Path, key_type: type, what: str) -> Any:
    """A PEM public key of ``key_type``."""
    data = read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"{path}: not {what} in PEM ({e})") from None
    if not isinstance(key, key_type):
        raise ValueError(f"{path}: holds a {type(key).__name__}, expected {what}")
    return key


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys (``json.loads`` would keep the last silently)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json.loads keeps the last of two equal keys; a registry listing one site twice is a bug.
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    data = read(path)
    try:
        doc = json.loads(data, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def b64_field(path: Path, doc: dict[str, Any], name: str, num_bytes: int) -> bytes:
    """``doc[name]`` decoded from strict base64, exactly ``num_bytes`` long."""
    value = doc.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        raw = base64.b64decode(value, validate=True)
    except ValueError as e:  # binascii.Error is a ValueError
        raise ValueError(f"{path}: {name!r} is not base64 ({e})") from None
    if len(raw) != num_bytes:
        raise ValueError(f"{path}: {name!r} decodes to {len(raw)} bytes, expected {num_bytes}")
    return raw
