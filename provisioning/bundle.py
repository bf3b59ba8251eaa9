"""Service bundles: the format a vendor publishes an algorithm in, its packer and its parser.

Theory of operation
-------------------
A vendor takes one routine out of its desktop program and puts it, with a
``manifest.toml``, in a directory.  The packer reads the manifest, checks it
strictly (every field present, known runtime, a parameter schema that is
itself a valid JSON Schema, limits in range), collects the directory's files
in a fixed order and writes one **deterministic CBOR document**::

    {
      "format":    "optogate-bundle/1",
      "manifest":  {name, version, runtime, entry, description,
                    input_type, output_type, params, limits},
      "files":     {relative/posix/path: bytes, ...},
      "digest":    SHA-256 of canonical-CBOR({"format", "manifest", "files"}),
      "signature": {"key_id": str, "value": Ed25519 signature}    (optional)
    }

Everything is encoded with CBOR's canonical rules (RFC 8949 section 4.2:
shortest forms, map keys sorted), so the same directory always gives the same
bytes, and a parser can insist that what it reads re-encodes to exactly the
bytes it was given: there is one valid encoding of each bundle, which closes
the door on tricks that make two parsers see different contents.

The digest covers the format tag, the manifest and every file; the optional
signature, by the vendor's (or publisher's) Ed25519 key, covers
``SIGNATURE_CONTEXT + digest``.  The context string keeps a bundle signature
from ever being valid as a signature over anything else the same key signs.
The signature lives outside the digested part, so central can verify the
vendor's signature and then wrap the same bundle in its own sealed envelope.

:func:`load_bundle` is the pure, strict parser every consumer uses (central's
``service publish``, the inner module's service builder): size caps first,
then canonical CBOR, exact key sets, the manifest checks the packer applies,
safe relative paths, the entry point present, and the digest.  Anything wrong
raises a :class:`BundleError` naming the problem; nothing is half-loaded.

The filesystem side (:func:`collect_files`, :func:`build_bundle`) is a thin
adapter: it refuses symlinks that leave the directory, skips caches and
hidden files, and applies the same size caps before anything is packed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol

import cbor2
import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from firmware.common.errors import OptogateError

if TYPE_CHECKING:
    from collections.abc import Iterable

FORMAT: Final = "optogate-bundle/1"
MANIFEST_NAME: Final = "manifest.toml"

#: Prefixed to the digest before signing, so a bundle signature can never be
#: replayed as a signature over some other object the same key signs.
SIGNATURE_CONTEXT: Final = b"optogate bundle signature v1\x00"

RUNTIMES: Final = ("python", "wasm")

#: Whole encoded bundle.  The largest reference bundle is a few tens of KiB;
#: 64 MiB leaves room for a vendor shipping lookup tables while keeping a
#: Raspberry Pi (1 GiB RAM) safe from a hostile "endless data" bundle.
MAX_BUNDLE_BYTES: Final = 64 * 1024 * 1024
#: One file inside a bundle.
MAX_FILE_BYTES: Final = 32 * 1024 * 1024
#: Files in one bundle: a routine is a handful of modules, not a program.
MAX_FILES: Final = 512
#: Relative path length, bytes (the common filesystem name limit).
MAX_PATH_LEN: Final = 255
#: Description length: a paragraph shown in catalogues, not a manual.
MAX_DESCRIPTION: Final = 4000

#: Limits a manifest may ask for.  An hour is longer than any interactive
#: call should take; 4 GiB is the address space of a 32-bit wasm module and
#: more than a Pi has; results are capped at 1 GiB for the same reason.
MAX_TIMEOUT_S: Final = 3600.0
MAX_MEMORY_MB: Final = 4096
MAX_RESULT_BYTES: Final = 1024 * 1024 * 1024

_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PY_ENTRY_RE: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_CONTENT_TYPE_RE: Final = re.compile(r"^[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*$")
_PATH_PART_RE: Final = re.compile(r"^[\w.+-]+$")
WASM_MAGIC: Final = b"\0asm"

_REQUIRED_FIELDS: Final = (
    "name",
    "version",
    "runtime",
    "entry",
    "description",
    "input_type",
    "output_type",
    "params",
    "limits",
)
_OPTIONAL_FIELDS: Final = ("include",)
_LIMIT_FIELDS: Final = ("timeout_s", "memory_mb", "max_result_bytes")
_TOP_KEYS: Final = frozenset({"format", "manifest", "files", "digest"})


class BundleError(OptogateError, ValueError):
    """A bundle or its source directory is malformed; the message says what and where."""


class ManifestError(BundleError):
    """A manifest is missing a field, names an unknown runtime or has an invalid value."""


class ParamsError(BundleError):
    """A call's parameters do not match the service's ``[params]`` schema."""


class BundleSignatureError(BundleError):
    """A bundle is unsigned, signed by another key, or its signature does not verify."""


class Signer(Protocol):
    """What the packer needs of a signing key (``firmware.common.crypto.keys.SigningKey``)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    """What :meth:`Bundle.verify` needs of a public key (``VerifyKey``)."""

    def verify(self, signature: bytes, data: bytes) -> None: ...


@dataclass(frozen=True)
class ManifestLimits:
    """Resource limits the service asks for; the gateway may lower, never raise them."""

    timeout_s: float
    memory_mb: int
    max_result_bytes: int


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.  ``params`` is the JSON Schema of the call parameters."""

    name: str
    version: int
    runtime: str
    entry: str
    description: str
    input_type: str
    output_type: str
    params: Mapping[str, Any]
    limits: ManifestLimits
    include: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as the plain dict stored in a bundle."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "entry": self.entry,
            "description": self.description,
            "input_type": self.input_type,
            "output_type": self.output_type,
            "params": _thaw(self.params),
            "limits": {
                "timeout_s": self.limits.timeout_s,
                "memory_mb": self.limits.memory_mb,
                "max_result_bytes": self.limits.max_result_bytes,
            },
        }
        if self.include:
            out["include"] = list(self.include)
        return out


@dataclass(frozen=True)
class BundleSignature:
    """A signature over ``SIGNATURE_CONTEXT + digest`` and the id of the key that made it."""

    key_id: str
    value: bytes


@dataclass(frozen=True)
class Bundle:
    """A parsed, digest-checked bundle.  Build one with :func:`pack` or :func:`load_bundle`."""

    manifest: Manifest
    files: Mapping[str, bytes]
    digest: bytes
    signature: BundleSignature | None = field(default=None)

    def to_bytes(self) -> bytes:
        """Return the canonical CBOR encoding of the bundle (what :func:`load_bundle` reads)."""
        doc = _digested_part(self.manifest, self.files)
        doc["digest"] = self.digest
        if self.signature is not None:
            doc["signature"] = {"key_id": self.signature.key_id, "value": self.signature.value}
        return cbor2.dumps(doc, canonical=True)

    def signed(self, key: Signer) -> Bundle:
        """Return a copy signed by ``key`` (any previous signature is replaced)."""
        value = key.sign(SIGNATURE_CONTEXT + self.digest)
        return Bundle(self.manifest, self.files, self.digest, BundleSignature(key.key_id, value))

    def verify(self, key: Verifier) -> None:
        """Check the signature against ``key``.

        Returns None when it verifies.  Raises BundleSignatureError when the
        bundle is unsigned or the signature does not verify with ``key``.
        """
        if self.signature is None:
            raise BundleSignatureError(f"bundle {self.manifest.name!r} is not signed")
        try:
            key.verify(self.signature.value, SIGNATURE_CONTEXT + self.digest)
        except OptogateError as e:
            raise BundleSignatureError(
                f"signature of bundle {self.manifest.name!r} (key {self.signature.key_id}) "
                "does not verify"
            ) from e

    @property
    def hexdigest(self) -> str:
        """The digest as lowercase hex (how it is shown and logged)."""
        return self.digest.hex()


# --------------------------------------------------------------------------- manifest


def parse_manifest(text: str) -> Manifest:
    """Parse and validate ``manifest.toml`` text.

    Returns the Manifest.  Raises ManifestError naming the first problem: TOML
    syntax, a missing or unknown field, an unknown runtime, an invalid JSON
    Schema under ``[params]``, or a value out of range.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{MANIFEST_NAME} is not valid TOML: {e}") from e
    return manifest_from_dict(raw)


def manifest_from_dict(raw: object) -> Manifest:
    """Validate a manifest given as a dict (from TOML or from a bundle).

    Returns the Manifest.  Raises ManifestError as :func:`parse_manifest` does.
    """
    if not isinstance(raw, dict):
        raise ManifestError("manifest must be a table")
    missing = [k for k in _REQUIRED_FIELDS if k not in raw]
    if missing:
        raise ManifestError(f"manifest is missing required field(s): {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise ManifestError(f"manifest has unknown field(s): {', '.join(map(str, unknown))}")

    name = _string(raw, "name")
    if not _NAME_RE.match(name):
        raise ManifestError(
            f"name {name!r} must be 1-63 lowercase letters, digits or '-', "
            "starting with a letter or digit"
        )
    version = raw["version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**63:
        raise ManifestError(f"version must be a positive integer, got {version!r}")
    runtime = _string(raw, "runtime")
    if runtime not in RUNTIMES:
        raise ManifestError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    entry = _string(raw, "entry")
    if runtime == "python" and not _PY_ENTRY_RE.match(entry):
        raise ManifestError(f"python entry {entry!r} must look like 'module:function'")
    if runtime == "wasm":
        _check_path(entry, what="wasm entry")
        if not entry.endswith(".wasm"):
            raise ManifestError(f"wasm entry {entry!r} must name a .wasm file in the bundle")
    description = _string(raw, "description")
    if len(description) > MAX_DESCRIPTION:
        raise ManifestError(f"description is longer than {MAX_DESCRIPTION} characters")
    input_type = _content_type(raw, "input_type")
    output_type = _content_type(raw, "output_type")
    params = _params_schema(raw["params"])
    limits = _limits(raw["limits"])
    include: tuple[str, ...] = ()
    if "include" in raw:
        inc = raw["include"]
        if not isinstance(inc, list) or not inc or not all(isinstance(p, str) and p for p in inc):
            raise ManifestError("include must be a non-empty list of glob patterns")
        include = tuple(inc)
    return Manifest(
        name=name,
        version=version,
        runtime=runtime,
        entry=entry,
        description=description,
        input_type=input_type,
        output_type=output_type,
        params=_freeze(params),
        limits=limits,
        include=include,
    )


def _string(raw: dict[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _content_type(raw: dict[str, Any], key: str) -> str:
    value = _string(raw, key)
    if not _CONTENT_TYPE_RE.match(value):
        raise ManifestError(f"{key} {value!r} is not a content type like 'application/json'")
    return value


def _params_schema(schema: object) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise ManifestError("[params] must be a table holding a JSON Schema")
    _check_json(schema, "params")
    validator_cls = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    try:
        validator_cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ManifestError(f"[params] is not a valid JSON Schema at {where}: {e.message}") from e
    if schema.get("type") != "object":
        raise ManifestError('[params] must describe an object: set type = "object"')
    return schema


def _check_json(value: object, where: str) -> None:
    """Refuse what JSON cannot carry (TOML dates, CBOR bytes or tags, NaN, huge ints)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ManifestError(f"{where}: {value!r} is not a JSON number")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**63:
            raise ManifestError(f"{where}: integer {value} is out of range")
    elif not (value is None or isinstance(value, str | bool)):
        raise ManifestError(f"{where}: a {type(value).__name__} is not a JSON value")


def _limits(raw: object) -> ManifestLimits:
    if not isinstance(raw, dict):
        raise ManifestError("[limits] must be a table")
    missing = [k for k in _LIMIT_FIELDS if k not in raw]
    if missing:
        raise ManifestError(f"[limits] is missing: {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_LIMIT_FIELDS))
    if unknown:
        raise ManifestError(f"[limits] has unknown field(s): {', '.join(map(str, unknown))}")
    timeout = raw["timeout_s"]
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise ManifestError(f"limits.timeout_s must be in (0, {MAX_TIMEOUT_S:g}], got {timeout!r}")
    memory = raw["memory_mb"]
    if not isinstance(memory, int) or isinstance(memory, bool) or not 1 <= memory <= MAX_MEMORY_MB:
        raise ManifestError(f"limits.memory_mb must be in [1, {MAX_MEMORY_MB}], got {memory!r}")
    result = raw["max_result_bytes"]
    if (
        not isinstance(result, int)
        or isinstance(result, bool)
        or not 1 <= result <= MAX_RESULT_BYTES
    ):
        raise ManifestError(
            f"limits.max_result_bytes must be in [1, {MAX_RESULT_BYTES}], got {result!r}"
        )
    return ManifestLimits(timeout_s=float(timeout), memory_mb=memory, max_result_bytes=result)


def _freeze(value: Any) -> Any:
    """Deep read-only copy, so a frozen Manifest cannot be changed through its schema."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def params_schema(manifest: Manifest) -> dict[str, Any]:
    """Return a mutable copy of the manifest's JSON Schema (for a jsonschema validator)."""
    result: dict[str, Any] = _thaw(manifest.params)
    return result


def validate_params(manifest: Manifest, params: object) -> None:
    """Check a call's parameters against the manifest's JSON Schema.

    Returns None when they match.  Raises ParamsError naming the first
    offending location ("params.password: ...") otherwise.
    """
    schema = params_schema(manifest)
    validator_cls = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(params))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise ParamsError(f"params{'.' + where if where else ''}: {error.message}")


# --------------------------------------------------------------------------- packing


def _check_path(path: str, what: str = "file path") -> None:
    if not path or len(path.encode()) > MAX_PATH_LEN:
        raise BundleError(f"{what} {path!r} is empty or longer than {MAX_PATH_LEN} bytes")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _PATH_PART_RE.match(part):
            raise BundleError(
                f"{what} {path!r} must be a relative POSIX path of letters, digits, '._+-'"
            )


def _digested_part(manifest: Manifest, files: Mapping[str, bytes]) -> dict[str, Any]:
    return {"format": FORMAT, "manifest": manifest.to_dict(), "files": dict(files)}


def _compute_digest(manifest: Manifest, files: Mapping[str, bytes]) -> bytes:
    return hashlib.sha256(cbor2.dumps(_digested_part(manifest, files), canonical=True)).digest()


def _check_files(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    if len(files) > MAX_FILES:
        raise BundleError(f"bundle has {len(files)} files; at most {MAX_FILES} are allowed")
    total = 0
    for path, content in files.items():
        if not isinstance(path, str):
            raise BundleError(f"file name {path!r} is not a string")
        _check_path(path)
        if path == MANIFEST_NAME:
            raise BundleError(f"{MANIFEST_NAME} is carried as the manifest, not as a file")
        if not isinstance(content, bytes):
            raise BundleError(f"file {path!r} content is not a byte string")
        if len(content) > MAX_FILE_BYTES:
            raise BundleError(f"file {path!r} is larger than {MAX_FILE_BYTES} bytes")
        total += len(content)
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle files total {total} bytes; at most {MAX_BUNDLE_BYTES}")
    if manifest.runtime == "python":
        module = manifest.entry.split(":", 1)[0].replace(".", "/")
        if f"{module}.py" not in files and f"{module}/__init__.py" not in files:
            raise BundleError(
                f"entry {manifest.entry!r}: neither {module}.py nor {module}/__init__.py "
                "is in the bundle"
            )
    else:
        wasm = files.get(manifest.entry)
        if wasm is None:
            raise BundleError(f"wasm entry {manifest.entry!r} is not in the bundle")
        if not wasm.startswith(WASM_MAGIC):
            raise BundleError(f"wasm entry {manifest.entry!r} is not a WebAssembly module")


def pack(manifest: Manifest, files: Mapping[str, bytes]) -> Bundle:
    """Build an (unsigned) bundle from a manifest and its files.

    Returns the Bundle, files in sorted path order.  Raises BundleError when a
    path is unsafe, a size cap is exceeded or the entry point is missing.
    """
    _check_files(manifest, files)
    ordered = MappingProxyType({p: files[p] for p in sorted(files)})
    return Bundle(manifest, ordered, _compute_digest(manifest, ordered))


#: Never packed: interpreter caches and editor/VCS litter.
_SKIP_DIRS: Final = frozenset({"__pycache__", ".git", ".hg", ".svn", ".mypy_cache"})
_SKIP_SUFFIXES: Final = (".pyc", ".pyo", "~")


def collect_files(directory: Path, manifest: Manifest) -> dict[str, bytes]:
    """Read the files of a bundle source directory (not ``manifest.toml``).

    Regular files are taken in sorted order, skipping hidden files, caches
    and, when the manifest has ``include`` patterns, files matching none of
    them.  A symlink is followed only when it stays inside ``directory``.

    Returns {relative posix path: content}.  Raises BundleError on a symlink
    that escapes, an unreadable file, or a size cap exceeded.
    """
    root = directory.resolve()
    files: dict[str, bytes] = {}
    total = 0
    for path in sorted(_walk(directory)):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if manifest.include and not any(fnmatch.fnmatchcase(rel, pat) for pat in manifest.include):
            continue
        real = path.resolve()
        if not real.is_relative_to(root):
            raise BundleError(f"{rel}: symlink points outside the bundle directory")
        if not real.is_file():
            continue
        size = real.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BundleError(f"{rel} is larger than {MAX_FILE_BYTES} bytes")
        total += size
        if total > MAX_BUNDLE_BYTES:
            raise BundleError(f"bundle files exceed {MAX_BUNDLE_BYTES} bytes")
        if len(files) >= MAX_FILES:
            raise BundleError(f"more than {MAX_FILES} files in {directory}")
        try:
            files[rel] = real.read_bytes()
        except OSError as e:
            raise BundleError(f"{rel}: cannot read: {e.strerror}") from e
    return files


def _walk(directory: Path, top: Path | None = None) -> Iterable[Path]:
    root = (top or directory).resolve()
    for entry in directory.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(_SKIP_SUFFIXES):
            continue
        if entry.is_dir():
            if entry.name in _SKIP_DIRS:
                continue
            if entry.is_symlink():
                if not entry.resolve().is_relative_to(root):
                    raise BundleError(f"{entry.name}: symlink points outside the bundle directory")
                continue  # its target is inside and is walked on its own
            yield from _walk(entry, top or directory)
        else:
            yield entry


def build_bundle(directory: Path, sign_key: Signer | None = None) -> Bundle:
    """Pack the bundle source directory ``directory`` (holding ``manifest.toml``).

    Returns the Bundle, signed when ``sign_key`` is given.  Raises
    ManifestError for a bad manifest and BundleError for a bad directory.
    """
    manifest_path = directory / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise BundleError(f"{directory}: no {MANIFEST_NAME}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: cannot read: {e}") from e
    manifest = parse_manifest(text)
    bundle = pack(manifest, collect_files(directory, manifest))
    return bundle.signed(sign_key) if sign_key is not None else bundle


# --------------------------------------------------------------------------- parsing


def load_bundle(data: bytes) -> Bundle:
    """Parse and check an encoded bundle.

    Returns the Bundle (its signature, if any, is *not* verified: call
    :meth:`Bundle.verify` with the expected key).  Raises BundleError when the
    data is too large, is not canonical CBOR, has missing or extra keys, a bad
    manifest, an unsafe path, a missing entry point or a wrong digest.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BundleError("bundle must be bytes")
    data = bytes(data)
    if len(data) > MAX_BUNDLE_BYTES + 1024 * 1024:
        raise BundleError(f"bundle is {len(data)} bytes; at most {MAX_BUNDLE_BYTES} allowed")
    try:
        doc = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError) as e:
        raise BundleError(f"bundle is not valid CBOR: {e}") from e
    if not isinstance(doc, dict):
        raise BundleError("bundle is not a CBOR map")
    keys = set(doc)
    if not keys >= _TOP_KEYS or not keys <= _TOP_KEYS | {"signature"}:
        raise BundleError(
            f"bundle keys are {sorted(map(str, keys))}; expected {sorted(_TOP_KEYS)} (+signature)"
        )
    if doc["format"] != FORMAT:
        raise BundleError(f"unsupported bundle format {doc['format']!r}; expected {FORMAT!r}")
    manifest = manifest_from_dict(doc["manifest"])
    files = doc["files"]
    if not isinstance(files, dict):
        raise BundleError("bundle files must be a map")
    _check_files(manifest, files)
    digest = doc["digest"]
    if not isinstance(digest, bytes) or len(digest) != hashlib.sha256().digest_size:
        raise BundleError("bundle digest must be 32 bytes")
    signature = None
    if "signature" in doc:
        sig = doc["signature"]
        if (
            not isinstance(sig, dict)
            or set(sig) != {"key_id", "value"}
            or not isinstance(sig["key_id"], str)
            or not isinstance(sig["value"], bytes)
        ):
            raise BundleError("bundle signature must be {key_id: str, value: bytes}")
        signature = BundleSignature(sig["key_id"], sig["value"])
    ordered = MappingProxyType({p: files[p] for p in sorted(files)})
    if _compute_digest(manifest, ordered) != digest:
        raise BundleError("bundle digest does not match its contents (damaged or tampered)")
    bundle = Bundle(manifest, ordered, digest, signature)
    if bundle.to_bytes() != data:
        raise BundleError("bundle is not canonically encoded")
    return bundle
