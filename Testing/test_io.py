"""Image I/O: orientation and spacing survive every format; multi-echo handling; bad input is refused.

The reference for geometry is nibabel's voxel->RAS affine (independent of SimpleITK), and DICOM slices
are written here from the RAS affine by hand (Image Position / Orientation Patient in LPS), so a sign
error in the LPS<->RAS conversion cannot cancel itself out.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from CMBDetectorLib import io
from CMBDetectorLib.errors import InputError
from CMBDetectorLib.image import Volume

SHAPE = (24, 20, 18)  # (I, J, K)
SPACING = (0.5, 0.7, 2.0)


def oblique_affine(spacing=SPACING, angles_deg=(12.0, -17.0, 28.0), origin=(31.5, -104.25, 17.0)):
    """Voxel->RAS affine with a rotation about all three axes and anisotropic voxels."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def integer_image(shape=SHAPE, seed=0) -> np.ndarray:
    """A float32 array of integers (exact in every format, int16 DICOM included), no symmetry."""
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.float32)


def assert_same_volume(volume: Volume, array: np.ndarray, affine: np.ndarray):
    assert volume.array.dtype == np.float32
    assert volume.array.shape == array.shape
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nibabel_written_nifti_reads_back_with_the_same_geometry(tmp_path, suffix):
    array, affine = integer_image(), oblique_affine()
    path = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(array, affine), path)

    volume = io.read_volume(path)

    assert_same_volume(volume, array, affine)
    assert volume.meta["format"] == "nifti" and volume.meta["echo"] is None
    # Physical positions agree with nibabel's own mapping for an arbitrary voxel.
    ijk = np.array([[3.0, 17.0, 11.0]])
    np.testing.assert_allclose(volume.ijk_to_ras(ijk), nib.affines.apply_affine(affine, ijk), atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_write_volume_round_trip_keeps_array_and_affine(tmp_path, suffix):
    array, affine = integer_image(seed=1), oblique_affine()
    path = io.write_volume(Volume(array, affine), tmp_path / f"scan{suffix}")

    assert_same_volume(io.read_volume(path), array, affine)
    if "nii" in suffix:  # written by SimpleITK, checked by nibabel
        reference = nib.load(path)
        np.testing.assert_allclose(reference.affine, affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(reference.dataobj), array)


def test_metaimage_header_is_lps(tmp_path):
    """The .mha header itself (parsed here, not by SimpleITK) holds LPS: x and y negated vs RAS."""
    affine = oblique_affine()
    path = io.write_volume(Volume(integer_image(), affine), tmp_path / "scan.mha")
    header = {}
    for line in path.read_bytes().split(b"ElementDataFile")[0].decode().splitlines():
        key, _, value = line.partition("=")
        header[key.strip()] = value.strip()
    offset = np.array(header["Offset"].split(), dtype=float)
    spacing = np.array(header["ElementSpacing"].split(), dtype=float)
    direction = np.array(header["TransformMatrix"].split(), dtype=float).reshape(3, 3).T  # column-major
    np.testing.assert_allclose(offset, affine[:3, 3] * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ direction @ np.diag(spacing), affine[:3, :3], atol=1e-5)


def test_write_volume_with_integer_dtype(tmp_path):
    array, affine = integer_image(seed=2), oblique_affine()
    path = io.write_volume(Volume(array, affine), tmp_path / "scan.nrrd", dtype=np.int16)
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
    assert_same_volume(io.read_volume(path), array, affine)


def test_volume_to_sitk_and_back(tmp_path):
    array, affine = integer_image(seed=3), oblique_affine()
    image = io.volume_to_sitk(Volume(array, affine))
    assert image.GetSize() == SHAPE  # SimpleITK sizes are (i, j, k)
    # Voxel (i, j, k) of the array is pixel (i, j, k) of the image, at the same (LPS) point.
    assert image.GetPixel(5, 7, 9) == array[5, 7, 9]
    lps = np.array(image.TransformIndexToPhysicalPoint((5, 7, 9)))
    np.testing.assert_allclose(lps * [-1, -1, 1], nib.affines.apply_affine(affine, [5, 7, 9]), atol=1e-6)
    assert_same_volume(io.sitk_to_volume(image), array, affine)


# ----------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def write_dicom_series(folder, array, affine, series_uid, echo_number=None, first_instance=1):
    """One file per k-slice; geometry tags computed from the RAS affine (not through io)."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    row_cosine, column_cosine = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    orientation = "\\".join(f"{v:.10f}" for v in np.concatenate([row_cosine, column_cosine]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[2]):
        instance = first_instance + k
        slice_image = sitk.GetImageFromArray(array[:, :, k].T.astype(np.int16))  # (j, i) rows
        slice_image.SetSpacing((float(spacing[0]), float(spacing[1])))
        position = lps @ np.array([0.0, 0.0, k, 1.0])
        tags = {
            "0008|0060": "MR", "0008|0008": "ORIGINAL\\PRIMARY\\M\\ND", "0010|0010": "Phantom^CMB",
            "0010|0020": "PHANTOM", "0020|000d": STUDY_UID, "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{instance}", "0020|0013": str(instance),
            "0020|0037": orientation, "0020|0032": "\\".join(f"{v:.10f}" for v in position[:3]),
            "0018|0050": f"{spacing[2]:.6f}",
        }
        if echo_number is not None:
            tags.update({"0018|0086": str(echo_number), "0018|0081": f"{10.0 * echo_number:.1f}"})
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{instance:05d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_reads_with_the_same_geometry(tmp_path):
    array, affine = integer_image(seed=4), oblique_affine()
    write_dicom_series(tmp_path / "dicom", array, affine, "1.2.826.0.1.3680043.8.498.10")

    volume = io.read_volume(tmp_path / "dicom")

    assert_same_volume(volume, array, affine)
    assert volume.meta["format"] == "dicom"
    assert volume.meta["series_uid"] == "1.2.826.0.1.3680043.8.498.10"
    # A single file stands for its whole series.
    assert_same_volume(io.read_volume(tmp_path / "dicom" / "IM00003.dcm"), array, affine)


def test_dicom_folder_picks_the_largest_series_or_the_named_one(tmp_path):
    affine = oblique_affine()
    big, small = integer_image(seed=5), integer_image(shape=(24, 20, 16), seed=6)
    write_dicom_series(tmp_path / "dicom", big, affine, "1.2.826.0.1.3680043.8.498.20")
    write_dicom_series(tmp_path / "dicom", small, affine, "1.2.826.0.1.3680043.8.498.21", first_instance=100)

    largest = io.read_volume(tmp_path / "dicom")
    named = io.read_volume(tmp_path / "dicom", series_uid="1.2.826.0.1.3680043.8.498.21")

    assert_same_volume(largest, big, affine)
    assert_same_volume(named, small, affine)
    assert largest.meta["n_series_in_folder"] == 2
    with pytest.raises(InputError, match="not found"):
        io.read_volume(tmp_path / "dicom", series_uid="1.2.3.999")


def test_multi_echo_dicom_series_is_combined_or_selected(tmp_path):
    affine = oblique_affine()
    echo1, echo2 = integer_image(seed=7), integer_image(seed=8)
    uid = "1.2.826.0.1.3680043.8.498.30"
    write_dicom_series(tmp_path / "dicom", echo1, affine, uid, echo_number=1, first_instance=1)
    write_dicom_series(tmp_path / "dicom", echo2, affine, uid, echo_number=2, first_instance=500)

    combined = io.read_volume(tmp_path / "dicom")
    second = io.read_volume(tmp_path / "dicom", echo=1)

    np.testing.assert_allclose(combined.array, np.sqrt(echo1 ** 2 + echo2 ** 2), rtol=1e-6)
    np.testing.assert_allclose(combined.affine, affine, atol=1e-4)
    assert combined.meta["echo"] == "combine" and combined.meta["n_echoes"] == 2
    assert_same_volume(second, echo2, affine)
    assert second.meta["echo"] == 1
    assert any("echo 1 of 2" in message for message in second.meta["messages"])


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no DICOM series"):
        io.read_volume(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Multi-echo and multi-component files
# ----------------------------------------------------------------------------------------------------

def test_4d_nifti_echoes_are_combined_by_root_sum_of_squares(tmp_path):
    affine = oblique_affine()
    echoes = np.stack([integer_image(seed=s) for s in (10, 11, 12)], axis=-1)
    path = tmp_path / "multiecho.nii.gz"
    nib.save(nib.Nifti1Image(echoes, affine), path)

    combined = io.read_volume(path)
    last = io.read_volume(path, echo=2)

    np.testing.assert_allclose(combined.array, np.sqrt((echoes.astype(float) ** 2).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(combined.affine, affine, atol=1e-4)
    assert combined.meta["echo"] == "combine" and combined.meta["n_echoes"] == 3
    assert "root sum of squares" in combined.meta["messages"][0]
    assert_same_volume(last, echoes[..., 2], affine)
    assert last.meta["echo"] == 2
    with pytest.raises(InputError, match="3 echoes"):
        io.read_volume(path, echo=3)


def test_vector_image_components_are_treated_as_echoes(tmp_path):
    affine = oblique_affine()
    components = np.stack([integer_image(seed=13), integer_image(seed=14)], axis=-1)  # (I, J, K, 2)
    image = sitk.GetImageFromArray(components.transpose(2, 1, 0, 3).copy(), isVector=True)
    reference = io.volume_to_sitk(Volume(components[..., 0], affine))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "vector.nrrd"))

    volume = io.read_volume(tmp_path / "vector.nrrd")

    np.testing.assert_allclose(volume.array, np.sqrt((components.astype(float) ** 2).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.meta["n_echoes"] == 2


def test_single_echo_file_refuses_another_echo_number(tmp_path):
    path = io.write_volume(Volume(integer_image(), oblique_affine()), tmp_path / "scan.nii.gz")
    assert io.read_volume(path, echo=0).meta["echo"] is None
    with pytest.raises(InputError, match="single echo"):
        io.read_volume(path, echo=1)


# ----------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere.nii.gz"
    with pytest.raises(InputError, match=f"file not found: {missing}"):
        io.read_volume(missing)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not a NIfTI file at all")
    with pytest.raises(InputError, match="cannot read image file .*broken.nii.gz"):
        io.read_volume(path)


def test_2d_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((40, 50), np.float32)), str(tmp_path / "slice.nrrd"))
    with pytest.raises(InputError, match="2D image"):
        io.read_volume(tmp_path / "slice.nrrd")


def test_5d_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2, 2), np.float32), np.eye(4)), tmp_path / "five.nii")
    with pytest.raises(InputError, match="5D image"):
        io.read_volume(tmp_path / "five.nii")


def test_write_to_unknown_extension_is_refused(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        io.write_volume(Volume(integer_image(), np.eye(4)), tmp_path / "scan.png")


# ----------------------------------------------------------------------------------------------------
# validate_brain_volume
# ----------------------------------------------------------------------------------------------------

def head_like(shape, spacing, seed=0) -> Volume:
    """A smooth float 'head' (ellipsoid with noise) on an axis-aligned grid."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g ** 2 for g in grids) < 0.8
    array = (inside * 400.0 + rng.normal(0, 5, shape)).astype(np.float32)
    return Volume(array, np.diag([*spacing, 1.0]))


@pytest.mark.parametrize("shape, spacing", [
    ((192, 192, 30), (1.0, 1.0, 5.0)),     # 1.5 T thick-slice 2D GRE
    ((160, 160, 60), (1.0, 1.0, 2.0)),     # SWI-like slab
    ((128, 128, 100), (1.2, 1.2, 1.2)),    # 3D GRE
])
def test_plausible_head_scans_pass(shape, spacing):
    volume = head_like(shape, spacing)
    assert io.validate_brain_volume(volume) is volume


def test_integer_mr_image_with_many_values_passes():
    volume = head_like((64, 64, 40), (3.0, 3.0, 3.0))
    volume.array = np.round(volume.array * 3 + 50)
    io.validate_brain_volume(volume)


@pytest.mark.parametrize("change, words", [
    (lambda v: Volume(v.array[..., 0], v.affine), "expected a 3D volume"),
    (lambda v: v.with_array(np.zeros_like(v.array)), "empty .all zero"),
    (lambda v: v.with_array(np.full_like(v.array, 7.0)), "empty .constant"),
    (lambda v: v.with_array(np.where(v.array > 300, np.nan, v.array)), "NaN or infinite"),
    (lambda v: v.with_array(np.where(v.array > 300, np.inf, v.array)), "NaN or infinite"),
    (lambda v: v.with_array((v.array > 200).astype(np.float32) * 2), "label map"),
    (lambda v: Volume(v.array[:, :, :10], v.affine), "too small to be a head"),
    (lambda v: Volume(v.array[:50, :50, :], v.affine), "too small to be a head"),
    (lambda v: Volume(v.array, np.diag([0.05, 1.0, 5.0, 1.0])), "voxel size"),
    (lambda v: Volume(v.array, np.diag([1.0, 1.0, 12.0, 1.0])), "voxel size"),
    (lambda v: Volume(v.array, np.zeros((4, 4))), "affine"),
])
def test_bad_volumes_are_refused_with_one_clear_line(change, words):
    good = head_like((192, 192, 30), (1.0, 1.0, 5.0))
    with pytest.raises(InputError, match=words) as caught:
        io.validate_brain_volume(change(good), name="scan.nii.gz")
    message = str(caught.value)
    assert message.startswith("scan.nii.gz: ") and "\n" not in message


def test_sheared_affine_is_written_with_nearest_rotation(tmp_path):
    affine = oblique_affine()
    affine[0, 1] += 1e-3  # rounding-level shear, as seen in some exported headers
    path = io.write_volume(Volume(integer_image(), affine), tmp_path / "sheared.nii.gz")
    np.testing.assert_allclose(io.read_volume(path).affine, affine, atol=5e-3)


def test_read_volume_accepts_string_paths(tmp_path):
    path = io.write_volume(Volume(integer_image(), oblique_affine()), tmp_path / "scan.mha")
    assert io.read_volume(str(path)).shape == SHAPE
