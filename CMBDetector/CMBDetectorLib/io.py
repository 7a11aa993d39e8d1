"""Reading and writing brain volumes, and checking that an input can be a GRE/SWI head scan.

Every format goes through SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM series) so there is one place where
orientation is handled. SimpleITK describes an image in LPS (origin, direction, spacing, array in
(k, j, i) order); a `Volume` holds an (i, j, k) float32 array and a voxel->RAS affine. The conversion:

    LPS = origin + direction @ diag(spacing) @ ijk
    RAS = diag(-1, -1, 1) @ LPS              (negate the first two rows)

Multi-echo input (a 4D image, a vector image, or one DICOM series holding several echoes) becomes one
3D volume: `echo="combine"` takes the root of the sum of squares over echoes, `echo=N` keeps echo N
(0-based). The choice is recorded in `volume.meta["echo"]` and explained in `volume.meta["messages"]`.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .image import Volume

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Sanity bounds for a head scan. A 1.5 T 2D GRE of 1x1x5 mm with ~30 slices (150 mm) passes; a single
# slice, a patch or a localiser does not.
MIN_VOXELS_PER_AXIS = 16
MIN_HEAD_EXTENT_MM = 60.0  # too small when two or more axes are shorter than this
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
MAX_LABEL_VALUES = 64  # an integer image with at most this many distinct values is a label map

WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_TAGS = {
    "series_uid": "0020|000e",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "echo_number": "0018|0086",
    "echo_time": "0018|0081",
    "instance_number": "0020|0013",
}


# ----------------------------------------------------------------------------------------------------
# Geometry conversion
# ----------------------------------------------------------------------------------------------------

def lps_geometry_to_affine(origin, spacing, direction) -> np.ndarray:
    """(4, 4) voxel->RAS affine from SimpleITK's LPS origin (3,), spacing (3,) and direction (3, 3)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return affine


def affine_to_lps_geometry(affine: np.ndarray):
    """Inverse of lps_geometry_to_affine: (origin (3,), spacing (3,), direction (3, 3)) in LPS.

    A sheared affine (columns not orthogonal) cannot be expressed as an ITK direction; the nearest
    rotation is used and a warning logged, rather than failing on a rounding-level shear.
    """
    affine = np.asarray(affine, dtype=float)
    linear = LPS_TO_RAS @ affine[:3, :3]
    spacing = np.sqrt((linear ** 2).sum(axis=0))
    if np.any(spacing <= 0) or not np.all(np.isfinite(affine)):
        raise InputError(f"the volume's affine is degenerate (voxel sizes {spacing.round(4).tolist()})")
    direction = linear / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        logger.warning("affine has shear; using the nearest rotation for the ITK direction")
        u, _, vt = np.linalg.svd(direction)
        direction = u @ vt
    origin = LPS_TO_RAS @ affine[:3, 3]
    return origin, spacing, direction


def _itk_geometry_3d(image: sitk.Image):
    """Origin, spacing and 3x3 direction of the first three axes of a 3D or 4D SimpleITK image."""
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension)[:3, :3]
    return np.asarray(image.GetOrigin()[:3]), np.asarray(image.GetSpacing()[:3]), direction


# ----------------------------------------------------------------------------------------------------
# SimpleITK <-> Volume
# ----------------------------------------------------------------------------------------------------

def volume_to_sitk(volume: Volume, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image (LPS geometry, pixel type from `dtype`) from a Volume's (I, J, K) array."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"expected a 3D volume, got {array.ndim}D array of shape {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=dtype))  # one copy
    origin, spacing, direction = affine_to_lps_geometry(volume.affine)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def sitk_to_volume(image: sitk.Image, echo="combine", source: str = "image") -> Volume:
    """A Volume (float32 (I, J, K), voxel->RAS affine) from a 3D SimpleITK image.

    4D images (4th axis = echoes) and multi-component pixels are reduced to 3D following `echo`
    ("combine": root sum of squares over echoes; an int: that echo, 0-based). Complex pixels become
    their magnitude. 2D and 5D+ images raise InputError.
    """
    dimension = image.GetDimension()
    if dimension == 2:
        raise InputError(f"{source} is a 2D image (size {list(image.GetSize())}); "
                         "CMBDetector needs a 3D brain volume")
    if dimension not in (3, 4):
        raise InputError(f"{source} is a {dimension}D image; CMBDetector reads 3D volumes or 4D "
                         "multi-echo series")
    origin, spacing, direction = _itk_geometry_3d(image)
    components = image.GetNumberOfComponentsPerPixel()
    data = sitk.GetArrayFromImage(image)  # (k, j, i), (t, k, j, i), or with a trailing component axis
    if dimension == 4 and components > 1:
        raise InputError(f"{source} is a 4D image with {components} components per voxel; "
                         "expected one echo axis at most")
    if dimension == 4:
        echoes = data.transpose(3, 2, 1, 0)  # (i, j, k, echo)
    elif components > 1:
        echoes = data.transpose(2, 1, 0, 3)  # (i, j, k, component)
    else:
        echoes = data.transpose(2, 1, 0)[..., np.newaxis]
    meta = {"source": source, "original_pixel_type": image.GetPixelIDTypeAsString()}
    kind = "components" if components > 1 else "echoes"
    array, echo_meta = _reduce_echoes(echoes, echo, source, kind)
    meta.update(echo_meta)
    return Volume(np.ascontiguousarray(array, dtype=np.float32),
                  lps_geometry_to_affine(origin, spacing, direction), meta)


def _reduce_echoes(echoes: np.ndarray, echo, source: str, kind: str = "echoes"):
    """(I, J, K, E) echoes (or vector components) -> (I, J, K) float32 array and the meta entries that record the choice."""
    meta = {"messages": [], "warnings": []}
    if np.iscomplexobj(echoes):
        echoes = np.abs(echoes)
        meta["warnings"].append(f"{source}: complex-valued voxels; using their magnitude")
    count = echoes.shape[-1]
    meta["n_echoes"] = int(count)
    if count == 1:
        if echo not in ("combine", None, 0):
            raise InputError(f"{source} has a single echo; cannot select echo {echo}")
        meta["echo"] = None
        return echoes[..., 0].astype(np.float32), meta
    if echo in ("combine", None):
        squares = np.square(echoes.astype(np.float64)).sum(axis=-1)
        array = np.sqrt(squares).astype(np.float32)
        meta["echo"] = "combine"
        message = f"{source}: {count} {kind} combined by root sum of squares"
    else:
        try:
            index = int(echo)
        except (TypeError, ValueError):
            raise InputError(f"echo must be 'combine' or an echo number, got {echo!r}") from None
        if not 0 <= index < count:
            raise InputError(f"{source} has {count} {kind} (0..{count - 1}); echo {index} does not exist")
        array = echoes[..., index].astype(np.float32)
        meta["echo"] = index
        message = f"{source}: using echo {index} of {count} {kind} (0-based)"
    meta["messages"].append(message)
    logger.info(message)
    return array, meta


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

def read_volume(path, echo="combine", series_uid: str | None = None) -> Volume:
    """Read a NIfTI / NRRD / MHA / MHD file or a DICOM folder into a Volume (float32, voxel->RAS).

    path: a file, or a folder holding DICOM files (the series with most files is read unless
        `series_uid` names one). A single .dcm file reads the series it belongs to from its own folder,
        or refuses; never another series.
    echo: "combine" (root sum of squares over echoes) or an int (0-based echo) for multi-echo data.
    Every failure to read is an InputError with one line; ITK's own warnings are not printed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if not (path.is_dir() or path.is_file()):  # a FIFO or device would block or never end
        raise InputError(f"{path} is not a regular file or a folder")
    with _quiet_itk():
        if path.is_dir():
            return _read_dicom_folder(path, echo, series_uid)
        if path.suffix.lower() == ".dcm":
            return _read_dicom_file(path, echo)
        try:
            image = sitk.ReadImage(str(path))
            volume = sitk_to_volume(image, echo, source=str(path))
        except RuntimeError as error:
            raise InputError(f"cannot read image file {path}: {_itk_reason(error)}") from None
    volume.meta["format"] = _format_name(path)
    if volume.meta["format"] == "nifti":
        _check_nifti_payload(path)
    return volume


def _read_dicom_folder(folder: Path, echo, series_uid: str | None, subfolders: bool = True) -> Volume:
    image, dicom_meta = _read_dicom_series(folder, series_uid, subfolders)
    try:
        volume = _combine_dicom_echoes(image, echo, str(folder)) if isinstance(image, list) \
            else sitk_to_volume(image, echo, source=str(folder))
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder}: {_itk_reason(error)}") from None
    messages = dicom_meta.pop("messages", []) + volume.meta.get("messages", [])
    volume.meta.update(dicom_meta, messages=messages, format="dicom")
    return volume


def _read_dicom_file(path: Path, echo) -> Volume:
    """The series that the DICOM file `path` belongs to, read from its own folder only."""
    uid = _dicom_tags(path).get("series_uid")
    if not uid:
        raise InputError(f"{path} is not a readable DICOM image (no series UID)")
    volume = _read_dicom_folder(path.parent, echo, uid, subfolders=False)
    volume.meta["source"] = str(path)
    return volume


@contextmanager
def _quiet_itk():
    """ITK prints warning blocks, and MetaIO and GDCM print lines, straight to stderr (GDCM scans, missing
    files, short reads); our one-line message says what matters, so both are silenced while we read."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    sys.stderr.flush()
    saved = os.dup(2)  # C++ code writes to file descriptor 2 itself, past sys.stderr
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _itk_reason(error: Exception) -> str:
    """The readable sentence of an ITK exception: not its source location, a matrix dumped after it, or
    a stale errno ("No such file or directory" about a file that exists)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines)
    if "determinant is 0" in text:
        return "singular direction matrix (determinant 0): the file's geometry is broken"
    if "Unable to determine ImageIO reader" in text:
        return "not an image in a format SimpleITK reads (unknown or corrupt header)"
    for index, line in enumerate(lines):
        if "ITK ERROR" in line:
            reason = line.split("ITK ERROR", 1)[1].lstrip(": ")
            if "): " in reason:  # drop the "NrrdImageIO(0x55...)" object prefix
                reason = reason.split("): ", 1)[1]
            if reason.endswith(":") and index + 1 < len(lines):  # the detail is on the last line (NRRD)
                reason = lines[-1].split(": ", 1)[-1]
            return "truncated, corrupt or not an image" + ("" if not reason else f" ({reason.rstrip('.')})")
    return lines[-1] if lines else "unknown reason"


def _check_nifti_payload(path: Path) -> None:
    """ITK's NIfTI reader pads a truncated file with zeros and turns NaN into 0, without a word: read the
    stored voxels once more with nibabel, which refuses a short file, and count non-finite floats."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        stored = np.asarray(image.dataobj)
    except Exception as error:  # nibabel raises many types (EOFError, OSError, zlib.error, HeaderDataError)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read image file {path}: truncated or corrupt ({reason})") from None
    if np.issubdtype(stored.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(stored)))
        if bad:
            raise InputError(f"{path}: contains {bad} NaN or infinite voxel values")


def _format_name(path: Path) -> str:
    name = path.name.lower()
    for extension, label in ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"),
                             (".nhdr", "nrrd"), (".mha", "metaimage"), (".mhd", "metaimage")):
        if name.endswith(extension):
            return label
    return path.suffix.lstrip(".").lower() or "unknown"


def _dicom_tags(path: Path) -> dict:
    """The few header fields needed to group and sort DICOM files (no pixel data read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {name: reader.GetMetaData(tag).strip() for name, tag in DICOM_TAGS.items()
            if reader.HasMetaDataKey(tag)}


def _find_dicom_series(folder: Path, subfolders: bool = True) -> dict:
    """{series_uid: [file names]} for every DICOM series in `folder` or, if none (and `subfolders`), its
    subfolders."""
    series = {}
    folders = [folder] + (sorted(Path(root) for root, _, _ in os.walk(folder) if Path(root) != folder)
                          if subfolders else [])
    for index, current in enumerate(folders):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(current)) or ():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(current), uid)
            series.setdefault(uid, []).extend(files)
        if index == 0 and series:
            break  # DICOM directly in the folder: do not mix in series from subfolders
    return series


def _read_dicom_series(folder: Path, series_uid: str | None, subfolders: bool = True):
    """A 3D SimpleITK image, or a list of them (one per echo), and meta about the chosen series."""
    series = _find_dicom_series(folder, subfolders)
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"DICOM series {series_uid} not found in {folder} "
                             f"(found: {', '.join(sorted(series))})")
        chosen = series_uid
    else:
        chosen = max(series, key=lambda uid: len(series[uid]))
    meta = {"series_uid": chosen, "n_series_in_folder": len(series)}
    if len(series) > 1:
        message = f"{folder}: {len(series)} DICOM series; read {chosen} ({len(series[chosen])} files)"
        meta["messages"] = [message]
        logger.info(message)
    groups = _group_by_echo(series[chosen])
    for files in groups:
        _refuse_missing_slices(files, f"DICOM series {chosen} in {folder}")
    try:
        images = [_read_series_files(files) for files in groups]
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series {chosen} in {folder}: {_itk_reason(error)}") from None
    return (images if len(images) > 1 else images[0]), meta


def _group_by_echo(files: list) -> list:
    """Split one series' files into echoes (by echo number, else echo time), each sorted along the
    slice normal so that several echoes sharing slice positions do not interleave."""
    tags = [(name, _dicom_tags(Path(name))) for name in files]
    groups = {}
    for name, tag in tags:
        key = tag.get("echo_number") or tag.get("echo_time") or ""
        groups.setdefault(key, []).append((name, tag))
    ordered = []
    for key in sorted(groups, key=_numeric_key):
        ordered.append([name for name, _ in sorted(groups[key], key=_slice_position)])
    return ordered


def _refuse_missing_slices(files: list, what: str) -> None:
    """InputError when the slices of one echo are not evenly spaced along their normal: a missing slice
    (ITK would read the series anyway, with every slice after the gap at the wrong place)."""
    positions = [_slice_position((name, _dicom_tags(Path(name)))) for name in files]
    if len(positions) < 3:
        return
    steps = np.diff(positions)
    if not np.any(steps > 0):
        return  # no usable positions: nothing to check against
    usual = float(np.median(steps[steps > 0]))  # duplicates (step 0) must not hide the usual spacing
    odd = np.nonzero(np.abs(steps - usual) > 0.5 * usual)[0]
    if len(odd):
        first = int(odd[0])
        raise InputError(f"{what}: slice spacing is not uniform (a gap of {steps[first]:.3g} mm after "
                         f"{Path(files[first]).name}, usually {usual:.3g} mm); a slice is missing or duplicated")


def _numeric_key(text: str):
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _slice_position(item) -> float:
    """Distance of a slice along its normal (from Image Orientation / Position Patient)."""
    name, tag = item
    try:
        orientation = np.array(tag["orientation"].split("\\"), dtype=float)
        position = np.array(tag["position"].split("\\"), dtype=float)
    except (KeyError, ValueError):
        return float(tag.get("instance_number", 0) or 0)
    normal = np.cross(orientation[:3], orientation[3:6])
    return float(position @ normal)


def _read_series_files(files: list) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    return reader.Execute()


def _combine_dicom_echoes(images: list, echo, source: str) -> Volume:
    """One Volume from several 3D echo images on the same grid."""
    sizes = {image.GetSize() for image in images}
    if len(sizes) != 1:
        raise InputError(f"{source}: echoes of the DICOM series have different sizes {sorted(sizes)}")
    reference = sitk_to_volume(images[0], source=source)
    echoes = np.stack([sitk_to_volume(image, source=source).array for image in images], axis=-1)
    array, echo_meta = _reduce_echoes(echoes, echo, source)
    return Volume(array, reference.affine, {**reference.meta, **echo_meta})


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------

def write_volume(volume: Volume, path, dtype=np.float32) -> Path:
    """Write a Volume as NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd).

    The voxel->RAS affine is kept (stored as LPS geometry, as each format expects). Pixels are
    written as `dtype` (float32 unless told otherwise).
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITE_EXTENSIONS):
        raise InputError(f"cannot write {path}: use one of {', '.join(WRITE_EXTENSIONS)}")
    image = volume_to_sitk(volume, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), useCompression=path.name.lower().endswith((".gz", ".nrrd")))
    except RuntimeError as error:
        raise InputError(f"cannot write {path}: {str(error).strip().splitlines()[-1]}") from None
    return path


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------

def validate_brain_volume(volume: Volume, name: str = "input", allow_crop: bool = False) -> Volume:
    """Raise InputError (one line, naming `name`) if `volume` cannot be a GRE/SWI head scan.

    Checks, in order: 3D; finite affine with sane voxel sizes; big enough to be a head; finite values;
    not empty or constant; not a label map. Returns the volume unchanged when it passes.
    allow_crop accepts a field of view smaller than a head (a partial-brain crop).
    """
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got a {array.ndim}D array of shape "
                         f"{tuple(array.shape)}")
    affine = np.asarray(volume.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{name}: the voxel-to-RAS affine is missing or degenerate")
    spacing = volume.spacing
    spacing_text = " x ".join(f"{s:.3g}" for s in spacing)
    if spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM:
        raise InputError(f"{name}: implausible voxel size {spacing_text} mm (expected "
                         f"{MIN_SPACING_MM}-{MAX_SPACING_MM} mm per axis)")
    shape = array.shape
    extent = np.asarray(shape) * spacing
    extent_text = " x ".join(f"{e:.0f}" for e in extent)
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{name}: too small to be a head scan: {shape} voxels (need at least "
                         f"{MIN_VOXELS_PER_AXIS} per axis)")
    if (extent < MIN_HEAD_EXTENT_MM).sum() >= 2 and not allow_crop:
        raise InputError(f"{name}: too small to be a head scan: field of view {extent_text} mm "
                         "(to analyse a partial-brain crop, say so with --crop)")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - finite.sum())
        raise InputError(f"{name}: contains {bad} NaN or infinite voxel values")
    low, high = float(array.min()), float(array.max())
    if low == high:
        what = "all zero" if high == 0 else f"constant ({high:g})"
        raise InputError(f"{name}: the image is empty ({what})")
    distinct = _count_distinct_if_integer(array)
    if distinct is not None and distinct <= MAX_LABEL_VALUES:
        raise InputError(f"{name}: looks like a label map or mask ({distinct} distinct integer "
                         "values), not a GRE/SWI magnitude image")
    return volume


def _count_distinct_if_integer(array: np.ndarray, sample_size: int = 2_000_000):
    """Number of distinct values when every voxel is an integer, else None.

    Checks a regular subsample first so that typical float MR images are rejected cheaply.
    """
    flat = array.reshape(-1)
    step = max(1, flat.size // sample_size)
    sample = flat[::step]
    if not np.all(sample == np.round(sample)):
        return None
    distinct_in_sample = np.unique(sample).size
    if distinct_in_sample > MAX_LABEL_VALUES:
        return distinct_in_sample
    if not np.all(flat == np.round(flat)):
        return None
    return int(np.unique(flat).size)
