"""Anatomical location of findings: register the scan to MNI152 2009, then read the region map.

Frames: `Volume` affines and `Finding.position_ras` are scanner RAS mm; MNI points are MNI152 2009 RAS mm.
SimpleITK works in LPS physical points, so x and y are negated at the boundary (`_LPS`).

Registration is affine (12 parameters), template -> scan: the MNI T1 is the fixed image (its brain mask
restricts the metric), the scan the moving one, both at 2 mm isotropic; Mattes mutual information
(contrast-agnostic: GRE / SWI magnitude against a T1 template); start from the centres of mass; rigid at
8 and 4 mm, then affine at 4 and 2 mm. About 1-5 s on 2 cores.
A registration that throws, or whose result is implausible (scale, shear, metric, interior metric, field
of view), is reported with ok=False; then every finding is "unknown", never an exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import atlas
from .grids import SLAB_ROWS
from .image import Volume
from .io import volume_to_sitk  # noqa: F401 - also used by the tests through this module

_LPS = np.diag([-1.0, -1.0, 1.0])
WORKING_SPACING_MM = 2.0
SCALE_RANGE = (0.75, 1.35)        # plausible template -> scan scale per axis (head size, voxel-size errors)
MAX_SHEAR = 0.15                  # |off-diagonal| of the normalised stretch matrix
MAX_METRIC = -0.12                # Mattes MI (negative; closer to 0 = less shared information)
MAX_INTERIOR_METRIC = -0.07       # the same inside the eroded brain (a uniform blob scores ~0)
HEAD_METRIC = -0.35               # a whole-head MI this strong is a head even when its GM/WM contrast is flat
MIN_BRAIN_IN_FOV = 0.80           # fraction of the template brain that must land inside the scan
OUTSIDE_REGIONS = ("outside", "csf")
GEOMETRY_CHECKS = ("scale", "shear", "field_of_view", "metric")


@dataclass
class Registration:
    """Result of register_to_mni.

    ok: True when the transform passed the plausibility checks; message: why not, or a summary.
    seconds: wall time; metric: final Mattes MI (negative, lower is better).
    mni_to_scan: (4, 4) float64, homogeneous MNI RAS mm -> scan RAS mm (None when registration threw).
    """

    ok: bool
    message: str
    seconds: float
    metric: float = float("nan")
    mni_to_scan: np.ndarray | None = None
    checks: dict = field(default_factory=dict)

    @property
    def plausible_geometry(self) -> bool:
        """A transform whose scale, shear, field of view and whole-head metric pass: good enough to carry the
        template's brain into the scan, even where the interior check withholds atlas locations."""
        return self.mni_to_scan is not None and all(self.checks.get(name, (False,))[0] for name in GEOMETRY_CHECKS)

    def to_mni(self, points_ras) -> np.ndarray:
        """(N, 3) scan RAS mm -> (N, 3) MNI RAS mm; NaN rows when there is no transform."""
        points = np.atleast_2d(np.asarray(points_ras, dtype=float)).reshape(-1, 3)
        if self.mni_to_scan is None:
            return np.full(points.shape, np.nan)
        scan_to_mni = np.linalg.inv(self.mni_to_scan)
        return points @ scan_to_mni[:3, :3].T + scan_to_mni[:3, 3]

    def to_scan(self, points_mni) -> np.ndarray:
        """(N, 3) MNI RAS mm -> (N, 3) scan RAS mm; NaN rows when there is no transform."""
        points = np.atleast_2d(np.asarray(points_mni, dtype=float)).reshape(-1, 3)
        if self.mni_to_scan is None:
            return np.full(points.shape, np.nan)
        return points @ self.mni_to_scan[:3, :3].T + self.mni_to_scan[:3, 3]


def _to_working_resolution(image, spacing_mm: float = WORKING_SPACING_MM):
    """Block-average to about spacing_mm per axis (fast, anti-aliased), keeping thick axes as they are."""
    import SimpleITK as sitk

    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    if max(factors) == 1:
        return image
    return sitk.BinShrink(image, factors)


def _template_images():
    """Fixed image (MNI T1 at 2 mm), its metric mask (brain dilated by ~4 mm), the brain, and the brain's
    interior (eroded by ~8 mm, for _interior_check); cached."""
    global _TEMPLATE_CACHE
    if _TEMPLATE_CACHE is None:
        import SimpleITK as sitk

        template = _to_working_resolution(volume_to_sitk(atlas.load_mni_template()))
        brain = _to_working_resolution(volume_to_sitk(atlas.load_mni_brain_mask()))
        brain = sitk.Cast(brain > 0.5, sitk.sitkUInt8)
        _TEMPLATE_CACHE = (template, sitk.BinaryDilate(brain, [2, 2, 2]), brain, sitk.BinaryErode(brain, [4, 4, 4]))
    return _TEMPLATE_CACHE


_TEMPLATE_CACHE = None


def _normalised_moving(volume: Volume):
    """Scan at working resolution, intensities clipped to the 0.5-99.5 percentiles (robust to hot voxels)."""
    array = np.asarray(volume.array, dtype=np.float32)
    if not np.isfinite(array).all():
        array = np.nan_to_num(array)
    low, high = np.percentile(array, [0.5, 99.5])
    if not np.isfinite(high - low) or high - low <= 0:
        raise ValueError("the image is constant")
    clipped = np.empty(array.shape, np.float32)
    for start in range(0, array.shape[0], SLAB_ROWS):  # slabs: no full-size float64 temporaries (memory)
        clipped[start:start + SLAB_ROWS] = np.clip((array[start:start + SLAB_ROWS] - low) / (high - low), 0, 1)
    return _isotropic(_to_working_resolution(volume_to_sitk(volume.with_array(clipped))))


def _isotropic(image, spacing_mm: float = WORKING_SPACING_MM):
    """Linear resampling to spacing_mm on every axis (same origin and direction).

    Thick-slice scans (1x1x4 mm) otherwise keep 4x coarser z voxels through the pyramid, and the rigid
    stage then sometimes settles in a wrong minimum (seen: 4-7 mm errors); isotropic voxels avoid it.
    """
    import SimpleITK as sitk

    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [max(1, int(round(e / spacing_mm))) for e in extent]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [spacing_mm] * 3, image.GetDirection(), 0.0, image.GetPixelID())


def _foreground_centre_lps(image) -> np.ndarray:
    """Intensity-weighted centre of the voxels above Otsu's threshold, LPS mm (the head, not the air)."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    threshold = sitk.OtsuThresholdImageFilter()
    threshold.SetInsideValue(0)
    threshold.SetOutsideValue(1)
    foreground = sitk.GetArrayFromImage(threshold.Execute(image)).astype(bool)
    if not foreground.any():
        foreground = np.ones(array.shape, dtype=bool)
    kji = np.argwhere(foreground)
    weights = array[foreground].astype(np.float64) + 1e-6
    centre_kji = (kji * weights[:, None]).sum(axis=0) / weights.sum()
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre_kji[::-1]]))


def _affine_lps_to_ras(transform) -> np.ndarray:
    """4x4 RAS matrix of a SimpleITK affine (fixed LPS -> moving LPS): y = A (x - c) + c + t."""
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    translation = np.array(transform.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = centre + translation - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def _fraction_of_brain_in_view(mni_to_scan: np.ndarray, volume: Volume) -> float:
    """Fraction of the template brain (every 4th voxel per axis) that maps inside the scan's voxel grid."""
    brain = atlas.load_mni_brain_mask()
    brain_mni = brain.ijk_to_ras(np.argwhere(brain.array[::4, ::4, ::4] > 0) * 4)
    scan_ijk = volume.ras_to_ijk(brain_mni @ mni_to_scan[:3, :3].T + mni_to_scan[:3, 3])
    inside = np.all((scan_ijk >= -0.5) & (scan_ijk <= np.array(volume.shape) - 0.5), axis=1)
    return float(inside.mean()) if len(inside) else 0.0


def _plausibility(mni_to_scan: np.ndarray, metric: float, volume: Volume) -> dict:
    """Named checks of a template -> scan transform; each value is (passed, description)."""
    linear = mni_to_scan[:3, :3]
    # Polar decomposition linear = R @ P with P = V S V^T: S holds the scales, P's off-diagonals the shear.
    _, scales, vt = np.linalg.svd(linear)
    stretch = vt.T @ np.diag(scales) @ vt
    shear = np.abs(stretch - np.diag(np.diag(stretch))).max() / np.diag(stretch).mean()
    in_view = _fraction_of_brain_in_view(mni_to_scan, volume)
    return {
        "scale": (bool(SCALE_RANGE[0] <= scales.min() and scales.max() <= SCALE_RANGE[1]),
                  f"scales {np.round(scales, 3).tolist()} (allowed {SCALE_RANGE[0]}-{SCALE_RANGE[1]})"),
        "shear": (bool(shear <= MAX_SHEAR), f"shear {shear:.3f} (max {MAX_SHEAR})"),
        "metric": (bool(np.isfinite(metric) and metric <= MAX_METRIC),
                   f"mutual information {metric:.3f} (must be <= {MAX_METRIC})"),
        "field_of_view": (bool(in_view >= MIN_BRAIN_IN_FOV),
                          f"{in_view:.0%} of the template brain inside the scan (min {MIN_BRAIN_IN_FOV:.0%})"),
    }


def _interior_check(method, transform, fixed, moving, interior, metric: float) -> tuple:
    """Mutual information inside the template brain eroded by 8 mm (ventricles, nuclei, white matter).

    The whole-brain metric also rewards any blob with a brain-shaped edge (a sphere phantom scores about
    -0.23, a brain -0.4 to -1.2); the interior carries information only when the scan is a brain. Some
    real GRE contrasts (TE where grey and white matter match) leave little interior information (as some
    randomised simulated 3 T GRE scans do), so a whole-head metric at or below HEAD_METRIC passes as well.
    """
    method.SetMetricFixedMask(interior)
    method.MetricUseMovingImageGradientFilterOff()  # a value alone needs no gradient image (0.15 s saved)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel([0.3], seed=54321)
    method.SetInitialTransform(transform, inPlace=True)
    value = float(method.MetricEvaluate(fixed, moving))
    passed = np.isfinite(value) and (value <= MAX_INTERIOR_METRIC or metric <= HEAD_METRIC)
    return (bool(passed), f"interior mutual information {value:.3f} (must be <= {MAX_INTERIOR_METRIC}, "
                          f"or the whole-head one <= {HEAD_METRIC})")


def _run_level_pair(method, fixed, moving, transform, sampling, learning_rate, iterations, shrink, smoothing_mm):
    """One optimisation of `transform` (in place) over two resolution levels."""
    method.SetInitialTransform(transform, inPlace=True)
    method.SetMetricSamplingPercentagePerLevel(sampling, seed=12345)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3,
                                                    numberOfIterations=iterations, relaxationFactor=0.6,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smoothing_mm)
    method.Execute(fixed, moving)


def register_to_mni(volume: Volume, mask=None) -> Registration:
    """Affine registration of a scan to the MNI152 2009 T1; never raises.

    volume: the scan (GRE / SWI magnitude, any voxel size, RAS affine); mask: optional brain mask (a Volume
    on any grid, or an (I, J, K) array on the scan's grid; nonzero = brain) restricting the metric on the
    scan side. Runs on one thread: the same scan always gives the same transform (see below).
    """
    import SimpleITK as sitk

    start = time.perf_counter()
    # ITK's Mattes metric adds up its threads' histograms in whichever order they finish, and it takes
    # ITK's global thread count, not the method's: on 2 threads one scan gave a different transform in
    # every run (entries ~5e-4 apart, brain masks ~0.1 %), so the same scan could get other findings. One
    # thread makes it repeatable, for about 0.5 s more per scan.
    process_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        fixed, fixed_mask, brain_mask, interior = _template_images()
        moving = _normalised_moving(volume)
        method = sitk.ImageRegistrationMethod()
        method.SetNumberOfThreads(1)
        method.MetricUseFixedImageGradientFilterOff()  # only the moving image's gradient moves the transform
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricFixedMask(fixed_mask)
        if mask is not None:
            mask = mask if isinstance(mask, Volume) else volume.with_array(np.asarray(mask))  # array on scan grid
            moving_mask = _to_working_resolution(volume_to_sitk(mask.with_array((mask.array > 0).astype(np.float32))))
            method.SetMetricMovingMask(sitk.Cast(moving_mask > 0.25, sitk.sitkUInt8))
        method.SetInterpolator(sitk.sitkLinear)

        # Start: align the template brain's centre with the scan's foreground centre, identity linear part.
        fixed_centre = _foreground_centre_lps(sitk.Mask(fixed, sitk.Cast(brain_mask, sitk.sitkUInt8)))
        moving_centre = _foreground_centre_lps(moving)
        rigid = sitk.VersorRigid3DTransform()
        rigid.SetCenter(fixed_centre.tolist())
        rigid.SetTranslation((moving_centre - fixed_centre).tolist())

        # Stage 1, rigid at coarse levels: gets rotation and position without letting scale run away.
        # Sampling: all voxels at 8 mm (a few thousand; fewer made the coarse metric too noisy and 20 deg
        # poses failed), then fewer as voxels get smaller.
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        _run_level_pair(method, fixed, moving, rigid, sampling=[1.0, 0.5], learning_rate=2.0, iterations=150,
                        shrink=[4, 2], smoothing_mm=[2.0, 1.0])

        # Stage 2, full affine at finer levels.
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        _run_level_pair(method, fixed, moving, affine, sampling=[0.5, 0.15], learning_rate=1.0, iterations=80,
                        shrink=[2, 1], smoothing_mm=[1.0, 0.0])
        metric = float(method.GetMetricValue())
        mni_to_scan = _affine_lps_to_ras(affine)
        checks = _plausibility(mni_to_scan, metric, volume)
        checks["interior"] = _interior_check(method, affine, fixed, moving, interior, metric)
    except Exception as error:  # noqa: BLE001 - any failure becomes "unknown" locations, not a crash
        return Registration(False, f"registration to MNI failed: {type(error).__name__}: {error}",
                            time.perf_counter() - start)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(process_threads)  # other ITK work keeps its own
    seconds = time.perf_counter() - start
    failed = [text for passed, text in checks.values() if not passed]
    if failed:
        return Registration(False, "registration to MNI rejected: " + "; ".join(failed), seconds, metric,
                            mni_to_scan, checks)
    return Registration(True, f"registered to MNI152 2009 in {seconds:.1f} s (MI {metric:.3f})", seconds, metric,
                        mni_to_scan, checks)


def _positions(findings) -> np.ndarray:
    return np.array([[float(v) for v in f.position_ras] for f in findings], dtype=float).reshape(-1, 3)


def classify_findings(findings, registration: Registration) -> list:
    """(region, lobe) per finding, regions including 'csf' / 'outside'; ('unknown', '') if not registered."""
    if not findings:
        return []
    if not registration.ok:
        return [("unknown", "")] * len(findings)
    return atlas.classify_mni(registration.to_mni(_positions(findings)))


def locate_findings(volume: Volume, findings, registration: Registration | None = None,
                    mask: Volume | None = None) -> list:
    """Set finding.region / finding.lobe from the atlas; returns a list of warning strings.

    Registers the scan when `registration` is None. Findings in CSF or outside the brain get region
    'unknown' here (Finding.region stays one of vocabulary.REGIONS); use outside_brain_flags to drop them.
    """
    warnings = []
    if registration is None:
        registration = register_to_mni(volume, mask)
    if not registration.ok:
        warnings.append(f"{registration.message}; locations set to 'unknown'")
    locations = classify_findings(findings, registration)
    outside = 0
    for finding, (region, lobe) in zip(findings, locations):
        if region in OUTSIDE_REGIONS:
            outside += 1
            region, lobe = "unknown", ""
        finding.region, finding.lobe = region, lobe
    if outside:
        warnings.append(f"{outside} finding(s) lie in CSF or outside the brain after registration")
    return warnings


def outside_brain_flags(findings, registration: Registration) -> list:
    """True per finding lying in CSF or outside the brain (more than 3 mm from brain tissue in MNI).

    Always False when the registration failed: without a transform nothing is dropped.
    """
    return [region in OUTSIDE_REGIONS for region, _ in classify_findings(findings, registration)]


def drop_outside_brain(findings, registration: Registration) -> tuple:
    """(kept, dropped) lists of findings, dropped = outside_brain_flags true."""
    flags = outside_brain_flags(findings, registration)
    kept = [f for f, flag in zip(findings, flags) if not flag]
    dropped = [f for f, flag in zip(findings, flags) if flag]
    return kept, dropped
