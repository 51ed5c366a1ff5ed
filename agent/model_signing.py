"""Signed model sets: the digest of every file of a set, and an ed25519 signature over it.

A model set copied onto an OR box must be the one its engineers released, byte for byte. ``sign``
writes two files into the set's folder:

    model-set.sha256   one line per file of the set, ``<sha256>  <path relative to the set>``, sorted
                       by path (the format ``sha256sum -c`` reads), every file but these two
    model-set.sig      the raw 64-byte ed25519 signature of ``model-set.sha256``'s bytes

``check_digests`` re-hashes a folder against the digest file (a changed, missing or unlisted file is
refused by name); ``verify_signature`` checks the signature with the box's trusted public keys. Keys
are PEM: ``keygen`` writes a PKCS#8 private key (mode 0600, kept by whoever releases sets, never on the
box) and its SubjectPublicKeyInfo public key (what the box trusts).

ed25519 (``cryptography``): deterministic signatures, small keys, no parameters to get wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_write_bytes, make_output_dir
from or_agent.pipelines.manifest import sha256_of

DIGEST_NAME = "model-set.sha256"
SIGNATURE_NAME = "model-set.sig"
PRIVATE_KEY_NAME = "model-signing.key"
PUBLIC_KEY_NAME = "model-signing.pub"
_NOT_DIGESTED = frozenset({DIGEST_NAME, SIGNATURE_NAME})


class SignatureError(InputError):
    """A set is unsigned, its signature does not verify, or a file differs from what was signed."""


@dataclass(frozen=True)
class KeyPair:
    private_key: Path
    public_key: Path


def set_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (relative, '/'-separated, sorted) but the digest and signature.
    A symbolic link is refused: what it points at could change after signing."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise InputError(f"{p}: a symbolic link in a model set (copy the file into the set instead)")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel not in _NOT_DIGESTED:
                found.append(rel)
    return sorted(found)


def digest_text(folder: Path) -> str:
    """The digest file's content for ``folder`` as it is now."""
    return "".join(f"{sha256_of(folder / rel)}  {rel}\n" for rel in set_files(folder))


def read_digests(folder: Path) -> dict[str, str] | None:
    """The digest file's entries (path -> sha256), or None when the set has none."""
    path = folder / DIGEST_NAME
    if not path.is_file():
        return None
    entries: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel:
            raise SignatureError(f"{path}:{lineno}: not a '<sha256>  <file>' line (digest file damaged)")
        entries[rel] = digest
    return entries


def check_digests(folder: Path) -> dict[str, str]:
    """Re-hash every file of the set against its digest file; the entries, or SignatureError naming the file."""
    entries = read_digests(folder)
    if entries is None:
        raise SignatureError(f"{folder}: no {DIGEST_NAME} (sign the set with `or-agent models sign`)")
    present = set_files(folder)
    for rel in present:
        if rel not in entries:
            raise SignatureError(f"{folder / rel}: not listed in {DIGEST_NAME} (file added after signing)")
    for rel, digest in entries.items():
        path = folder / rel
        if rel not in present:
            raise SignatureError(f"{path}: listed in {DIGEST_NAME} but missing (file removed after signing)")
        if sha256_of(path) != digest:
            raise SignatureError(f"{path}: sha256 differs from {DIGEST_NAME} (file changed after signing)")
    return entries


def _load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise InputError(f"{path}: no such key file") from None
    except (TypeError, ValueError):
        raise InputError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: not an ed25519 private key (make one with `or-agent models keygen`)")
    return key


def load_public_key(path: str | os.PathLike):
    """A trusted ed25519 public key (PEM); InputError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: no such trusted key file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{path}: not an ed25519 public key (make one with `or-agent models keygen`)")
    return key


def keygen(out_dir: Path) -> KeyPair:
    """A new signing key pair in ``out_dir``; never overwrites one that is there."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir = Path(out_dir)
    pair = KeyPair(out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME)
    for p in (pair.private_key, pair.public_key):
        if p.exists():
            raise InputError(f"{p}: already exists (a new key would orphan the sets signed with it; move it aside first)")
    make_output_dir(out_dir)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # created 0600 from the start: never briefly readable by others
    fd = os.open(pair.private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    atomic_write_bytes(pair.public_key, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pair


def sign(folder: Path, private_key: Path) -> tuple[Path, Path]:
    """Write the set's digest file and its signature; returns their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such model set folder")
    key = _load_private(private_key)
    text = digest_text(folder).encode("utf-8")
    atomic_write_bytes(folder / DIGEST_NAME, text)
    atomic_write_bytes(folder / SIGNATURE_NAME, key.sign(text))
    return folder / DIGEST_NAME, folder / SIGNATURE_NAME


def verify_signature(folder: Path, trusted_keys: Sequence[str | os.PathLike]) -> Path:
    """Check ``model-set.sig`` over ``model-set.sha256`` with any of the trusted keys, then every file
    against the digests; the key file that verified it, or SignatureError with the reason."""
    from cryptography.exceptions import InvalidSignature

    folder = Path(folder)
    keys = [(Path(p), load_public_key(p)) for p in trusted_keys]
    sig_path, digest_path = folder / SIGNATURE_NAME, folder / DIGEST_NAME
    if not sig_path.is_file() or not digest_path.is_file():
        missing = sig_path if not sig_path.is_file() else digest_path
        raise SignatureError(f"{folder}: unsigned model set ({missing.name} missing) and this box trusts only "
                             "signed sets")
    signature, signed = sig_path.read_bytes(), digest_path.read_bytes()
    for path, key in keys:
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            continue
        check_digests(folder)
        return path
    names = ", ".join(str(p) for p, _ in keys)
    raise SignatureError(f"{sig_path}: signature does not verify with any trusted key ({names}): "
                         "signed by another key, or the digest file was changed")
