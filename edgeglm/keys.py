"""Ed25519 signing keys: create, load, identify.

A key pair is two PEM files: ``NAME.key`` (PKCS#8 private key, mode 0600) and ``NAME.pub``
(SubjectPublicKeyInfo). The key id is the first 16 hex characters of the BLAKE3 of the raw
32-byte public key; manifests name their signing key by it, and agents trust configured public
keys only.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeglm.errors import ConfigError, ConflictError, NotFoundError

__all__ = ["create_keypair", "key_id", "load_private_key", "load_public_key", "load_public_keys"]


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return blake3.blake3(raw).hexdigest()[:16]


def create_keypair(directory: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` and ``NAME.pub`` into ``directory``; return both paths and the key id."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise ConflictError(
            f"key {name}", f"{priv_path} or {pub_path} already exists", hint="Pick another name."
        )
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = private.public_key()
    pub_path.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv_path, pub_path, key_id(public)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"{what} {path}", "no such file", hint="Create one with 'edgectl keys create'."
        ) from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"private key {path}", f"not an unencrypted PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path}", f"is {type(key).__name__}, expected Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"public key {path}", f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path}", f"is {type(key).__name__}, expected Ed25519")
    return key


def load_public_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by key id."""
    keys = {}
    for p in paths:
        k = load_public_key(p)
        keys[key_id(k)] = k
    return keys
