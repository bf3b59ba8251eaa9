"""Bundle packer and parser: manifest checks, determinism, tamper and signature detection."""

from __future__ import annotations

import os
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.keys import SigningKey
from provisioning import bundle_cli
from provisioning.bundle import (
    FORMAT,
    BundleError,
    BundleSignatureError,
    ManifestError,
    build_bundle,
    load_bundle,
    manifest_from_dict,
    parse_manifest,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

REFERENCE = Path(__file__).resolve().parents[3] / "provisioning" / "reference"

GOOD = """
name = "demo"
version = 3
runtime = "python"
entry = "demo:run"
description = "A demo."
input_type = "application/octet-stream"
output_type = "application/json"

[params]
type = "object"
required = ["x"]
[params.properties.x]
type = "integer"

[limits]
timeout_s = 5
memory_mb = 64
max_result_bytes = 1000
"""


def _write(tmp_path: Path, manifest: str = GOOD, files: dict[str, bytes] | None = None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.toml").write_text(manifest)
    for rel, content in (files or {"demo.py": b"def run(p, d):\n    return {}\n"}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    return src


def _without(field: str) -> str:
    return "\n".join(line for line in GOOD.splitlines() if not line.startswith(f"{field} ="))


@pytest.mark.parametrize(
    "field", ["name", "version", "runtime", "entry", "description", "input_type", "output_type"]
)
def test_missing_field_is_refused_by_name(field: str) -> None:
    with pytest.raises(ManifestError, match=f"missing required field.*{field}"):
        parse_manifest(_without(field))


def test_missing_tables_are_refused() -> None:
    text = GOOD.split("[params]", maxsplit=1)[0]
    with pytest.raises(ManifestError, match="params, limits"):
        parse_manifest(text)
    with pytest.raises(ManifestError, match=r"\[limits\] is missing: memory_mb"):
        parse_manifest(GOOD.replace("memory_mb = 64\n", ""))


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ManifestError, match="unknown runtime 'java'"):
        parse_manifest(GOOD.replace('runtime = "python"', 'runtime = "java"'))


def test_invalid_schema_is_refused_with_location() -> None:
    bad = GOOD.replace('type = "integer"', 'type = "integr"')
    with pytest.raises(ManifestError, match="not a valid JSON Schema at properties/x"):
        parse_manifest(bad)
    with pytest.raises(ManifestError, match="must describe an object"):
        parse_manifest(GOOD.replace('[params]\ntype = "object"', '[params]\ntype = "array"'))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("version = 3", "version = 0", "version must be a positive integer"),
        ("version = 3", 'version = "3"', "version must be a positive integer"),
        ('name = "demo"', 'name = "Demo!"', "name 'Demo!'"),
        ('entry = "demo:run"', 'entry = "demo"', "module:function"),
        ("timeout_s = 5", "timeout_s = -1", "timeout_s"),
        ("memory_mb = 64", "memory_mb = 1.5", "memory_mb"),
        ('input_type = "application/octet-stream"', 'input_type = "bytes"', "content type"),
        ("version = 3", "version = 3\ncolour = 1", "unknown field"),
        ("version = 3", "version = 3\n[", "not valid TOML"),
    ],
)
def test_bad_values_are_refused(old: str, new: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(GOOD.replace(old, new))


def test_build_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    src = _write(tmp_path, files={"demo.py": b"x = 1\n", "lib/b.py": b"b", "lib/a.txt": b"a"})
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "demo.cpython-311.pyc").write_bytes(b"cache")
    (src / ".hidden").write_bytes(b"secret")
    first = build_bundle(src).to_bytes()
    # Creation order and times must not matter.
    os.utime(src / "lib" / "a.txt", (1, 1))
    assert build_bundle(src).to_bytes() == first
    loaded = load_bundle(first)
    assert list(loaded.files) == ["demo.py", "lib/a.txt", "lib/b.py"]
    assert loaded.manifest.version == 3
    assert loaded.manifest.limits.max_result_bytes == 1000
    assert loaded.manifest.params["properties"]["x"]["type"] == "integer"
    assert loaded.to_bytes() == first
    assert cbor2.loads(first)["format"] == FORMAT


def test_missing_entry_module_is_refused(tmp_path: Path) -> None:
    src = _write(tmp_path, files={"other.py": b""})
    with pytest.raises(BundleError, match=r"demo\.py"):
        build_bundle(src)


def test_symlink_escaping_the_directory_is_refused(tmp_path: Path) -> None:
    src = _write(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("do not ship")
    (src / "leak.txt").symlink_to(outside)
    with pytest.raises(BundleError, match=r"leak\.txt: symlink points outside"):
        build_bundle(src)


def test_symlink_inside_the_directory_is_followed(tmp_path: Path) -> None:
    src = _write(tmp_path)
    (src / "alias.py").symlink_to(src / "demo.py")
    bundle = build_bundle(src)
    assert bundle.files["alias.py"] == bundle.files["demo.py"]


def test_wasm_entry_must_be_a_module(tmp_path: Path) -> None:
    text = GOOD.replace('runtime = "python"', 'runtime = "wasm"').replace(
        'entry = "demo:run"', 'entry = "demo.wasm"'
    )
    with pytest.raises(BundleError, match="not a WebAssembly module"):
        build_bundle(_write(tmp_path, text, {"demo.wasm": b"MZ\x90\x00"}))


def test_tampering_is_detected(tmp_path: Path) -> None:
    data = build_bundle(_write(tmp_path)).to_bytes()
    doc = cbor2.loads(data)
    doc["files"]["demo.py"] = b"import os; os.system('rm -rf /')\n"
    with pytest.raises(BundleError, match="digest does not match"):
        load_bundle(cbor2.dumps(doc, canonical=True))
    doc = cbor2.loads(data)
    doc["manifest"]["limits"]["timeout_s"] = 3600.0
    with pytest.raises(BundleError, match="digest does not match"):
        load_bundle(cbor2.dumps(doc, canonical=True))


def test_non_canonical_encoding_is_refused(tmp_path: Path) -> None:
    data = build_bundle(_write(tmp_path)).to_bytes()
    doc = cbor2.loads(data)
    with pytest.raises(BundleError, match="not canonically encoded"):
        load_bundle(cbor2.dumps(doc, canonical=False))


def test_extra_keys_and_unsafe_paths_are_refused(tmp_path: Path) -> None:
    doc = cbor2.loads(build_bundle(_write(tmp_path)).to_bytes())
    with pytest.raises(BundleError, match="bundle keys"):
        load_bundle(cbor2.dumps({**doc, "extra": 1}, canonical=True))
    doc["files"]["../evil.py"] = b""
    with pytest.raises(BundleError, match="relative POSIX path"):
        load_bundle(cbor2.dumps(doc, canonical=True))


def test_signature_verifies_and_detects_the_wrong_key(tmp_path: Path) -> None:
    vendor, other = SigningKey.generate(), SigningKey.generate()
    bundle = build_bundle(_write(tmp_path), vendor)
    loaded = load_bundle(bundle.to_bytes())
    assert loaded.signature is not None
    assert loaded.signature.key_id == vendor.key_id
    loaded.verify(vendor.public)
    with pytest.raises(BundleSignatureError, match="does not verify"):
        loaded.verify(other.public)
    doc = cbor2.loads(bundle.to_bytes())
    doc["signature"]["value"] = bytes(64)
    with pytest.raises(BundleSignatureError):
        load_bundle(cbor2.dumps(doc, canonical=True)).verify(vendor.public)
    unsigned = build_bundle(tmp_path / "src")
    with pytest.raises(BundleSignatureError, match="not signed"):
        unsigned.verify(vendor.public)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_bundle_error(data: bytes) -> None:
    with pytest.raises(BundleError):
        load_bundle(data)


@pytest.mark.parametrize("name", ["echo", "doc-encrypt", "dxf2svg"])
def test_reference_sources_pack(name: str) -> None:
    bundle = load_bundle(build_bundle(REFERENCE / name).to_bytes())
    assert bundle.manifest.name == name
    assert bundle.manifest.runtime == "python"


def test_cli_build_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "vendor.key")
    key.public.save(tmp_path / "vendor.pub")
    src = _write(tmp_path)
    out = tmp_path / "demo.ogb"
    argv = ["build", str(src), "--out", str(out), "--sign-key", str(tmp_path / "vendor.key")]
    assert bundle_cli.main(argv, "bundle") == 0
    assert key.key_id in capsys.readouterr().out
    argv = ["inspect", str(out), "--verify-key", str(tmp_path / "vendor.pub")]
    assert bundle_cli.main(argv, "bundle") == 0
    printed = capsys.readouterr().out
    assert "name:         demo" in printed
    assert "demo.py" in printed
    assert "signature:    verified" in printed
    (src / "manifest.toml").write_text(GOOD.replace("python", "cobol"))
    assert bundle_cli.main(["build", str(src), "--out", str(out)], "bundle") == 1
    assert "unknown runtime 'cobol'" in capsys.readouterr().err


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from([*parse_manifest(GOOD).to_dict(), "x"]), _json_values))
def test_random_manifest_dicts_only_raise_manifest_error(raw: dict[str, object]) -> None:
    try:
        manifest = manifest_from_dict(raw)
    except ManifestError:
        return
    assert manifest_from_dict(manifest.to_dict()) == manifest


@given(st.data())
def test_mutated_manifest_text_parses_or_raises_manifest_error(data: st.DataObject) -> None:
    lines = GOOD.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = data.draw(
            st.sampled_from(["", "[params]", "type = 1", 'x = "y"', "version = -1", "[limits]"])
            | st.text(max_size=20)
        )
    try:
        manifest = parse_manifest("\n".join(lines))
    except ManifestError:
        return
    # Whatever parsed must survive the round trip through a bundle unchanged.
    assert manifest_from_dict(manifest.to_dict()) == manifest


def test_params_are_validated_against_the_schema() -> None:
    from provisioning.bundle import ParamsError, validate_params

    manifest = parse_manifest((REFERENCE / "doc-encrypt" / "manifest.toml").read_text())
    validate_params(manifest, {"op": "encrypt", "password": "x"})
    with pytest.raises(ParamsError, match=r"^params\.op: 'zip' is not one of"):
        validate_params(manifest, {"op": "zip", "password": "x"})
    with pytest.raises(ParamsError, match="'password' is a required property"):
        validate_params(manifest, {"op": "encrypt"})
    with pytest.raises(ParamsError, match="is not of type 'object'"):
        validate_params(manifest, ["op"])


@given(st.data())
def test_mutated_bundles_only_raise_bundle_error(data: st.DataObject) -> None:
    good = bytearray(_REFERENCE_ECHO)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(good)))
    mutated = bytes(good[:cut])
    try:
        bundle = load_bundle(mutated)
    except BundleError:
        return
    # A mutation may only survive if it changed nothing the digest covers.
    assert bundle.to_bytes() == mutated
    assert bundle.files == load_bundle(_REFERENCE_ECHO).files


_REFERENCE_ECHO = build_bundle(REFERENCE / "echo").to_bytes()


def test_params_schema_must_be_plain_json() -> None:
    text = GOOD.replace('[params]\ntype = "object"', '[params]\ntype = "object"\nwhen = 1979-05-27')
    with pytest.raises(ManifestError, match=r"params\.when: a date is not a JSON value"):
        parse_manifest(text)
    raw = parse_manifest(GOOD).to_dict()
    raw["params"]["default"] = b"\x00"
    with pytest.raises(ManifestError, match="bytes is not a JSON value"):
        manifest_from_dict(raw)
