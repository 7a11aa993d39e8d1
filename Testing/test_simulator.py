"""Physics of the simulator, checked against closed forms and against what radiologists see."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from CMBDetectorLib import io
from CMBDetectorLib.phase import homodyne_phase
from CMBDetectorLib.simulate import domain, physics
from CMBDetectorLib.simulate.structures import Sphere, apparent_diameter, sphere_voxel_factors
from CMBDetectorLib.simulate.synth import scan_plan, simulate_scan, simulate_set, write_scan


def test_fft_dipole_field_of_a_sphere_matches_the_analytic_field_outside_it():
    spacing = 0.5
    n = 96
    radius = 4.0
    axis = (np.arange(n) - n / 2) * spacing
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    # Partial-volume sphere from 4x supersampling so its k-space content is close to a true sphere.
    offsets = (np.arange(4) + 0.5) / 4 - 0.5
    fraction = np.zeros_like(x)
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                fraction += ((x + ox * spacing) ** 2 + (y + oy * spacing) ** 2 + (z + oz * spacing) ** 2) <= radius ** 2
    chi = 1.0 * fraction / 64
    field = physics.field_from_susceptibility(chi, (spacing,) * 3, pad_fraction=1.0)
    points = np.stack([x, y, z], axis=-1)
    analytic = physics.sphere_field(points, radius, 1.0)
    r = np.linalg.norm(points, axis=-1)
    shell = (r > 1.5 * radius) & (r < 3 * radius)
    error = np.abs(field[shell] - analytic[shell])
    assert error.max() < 0.05 * (1 / 3) * (1 / 1.5) ** 3 * 2  # under 5 % of the peak field on the shell
    # The two lobes along B0 are positive, the equator negative (3 cos^2 - 1).
    centre = n // 2
    assert field[centre, centre, centre + 12] > 0.05
    assert field[centre + 12, centre, centre] < -0.02


def _sphere(kind="microbleed", chi=1.0, diameter=2.0, core=0.05):
    return Sphere(kind, np.zeros(3), diameter, chi, core_signal=core)


def _grid(spacing):
    affine = np.diag([*spacing, 1.0])
    shape = tuple(int(40 / s) for s in spacing)
    affine[:3, 3] = -np.array(shape) * np.array(spacing) / 2
    return affine, shape


@pytest.mark.parametrize("coarse_shape, shape", [((8, 9, 7), (214, 262, 196)), ((4, 4, 4), (30, 17, 9))])
def test_the_elastic_field_is_the_cubic_spline_zoom_of_its_control_grid(coarse_shape, shape):
    """grids.spline_zoom, one axis at a time, gives the 3D zoom's values (the simulator's elastic field)."""
    from scipy import ndimage

    from CMBDetectorLib.grids import spline_zoom

    control = np.random.default_rng(3).normal(0, 2.0, coarse_shape).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse_shape)]
    expected = ndimage.zoom(control, zoom, order=3, mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]
    field = spline_zoom(control, shape)
    assert field.dtype == np.float32 and field.shape == expected.shape == shape
    np.testing.assert_allclose(field, expected, rtol=0, atol=1e-5)
    assert np.abs(field).max() > 1.0  # a field, not zeros


def test_apparent_size_grows_with_echo_time_and_field_strength():
    affine, shape = _grid((0.5, 0.5, 0.5))
    sphere = _sphere(chi=0.8, diameter=2.0)
    at_3t_20ms = apparent_diameter(sphere, affine, shape, 3.0, 0.020)
    at_3t_40ms = apparent_diameter(sphere, affine, shape, 3.0, 0.040)
    at_15t_20ms = apparent_diameter(sphere, affine, shape, 1.5, 0.020)
    assert at_3t_20ms > sphere.diameter_mm  # it blooms
    assert at_3t_40ms > at_3t_20ms * 1.15
    assert at_15t_20ms < at_3t_20ms


def test_small_weak_lesion_is_nearly_invisible_and_big_strong_one_blooms():
    affine, shape = _grid((0.5, 0.5, 2.0))  # a 3 T SWI voxel
    faint = apparent_diameter(_sphere(chi=0.5, diameter=1.0, core=0.5), affine, shape, 3.0, 0.020)
    strong = apparent_diameter(_sphere(chi=1.0, diameter=2.0), affine, shape, 3.0, 0.020)
    assert faint < 1.0
    assert 1.2 < strong / 2.0 < 2.2  # literature: a 2 mm, 1 ppm sphere blooms to about 1.6x


def _lesion_on_uniform_background(sphere, spacing=(0.5, 0.5, 2.0), b0=3.0, te=0.020):
    affine, shape = _grid(spacing)
    signal = np.ones(shape, np.complex64)
    box, factors = sphere_voxel_factors(sphere, affine, shape, b0, te)
    signal[box] *= factors
    return signal, affine, shape


def _equatorial_ring_phase(signal, affine, diameter):
    spacing = np.diag(affine)[:3]
    centre = np.round(-affine[:3, 3] / spacing).astype(int)
    k = centre[2]
    ii, jj = np.meshgrid(np.arange(signal.shape[0]), np.arange(signal.shape[1]), indexing="ij")
    r = np.hypot((ii - centre[0]) * spacing[0], (jj - centre[1]) * spacing[1])
    ring = (r > diameter) & (r < 2.5 * diameter)
    return float(np.mean(np.angle(signal[:, :, k])[ring]))


def test_microbleed_is_dark_on_magnitude_and_swi_with_phase_opposite_to_calcification():
    cmb, cmb_affine, _ = _lesion_on_uniform_background(_sphere("microbleed", chi=1.0, diameter=3.0))
    calc, calc_affine, _ = _lesion_on_uniform_background(_sphere("calcification", chi=-1.0, diameter=3.0, core=0.2))
    centre = tuple(np.round(-cmb_affine[:3, 3] / np.diag(cmb_affine)[:3]).astype(int))
    assert abs(cmb[centre]) < 0.3
    swi = physics.swi_magnitude(np.abs(cmb), homodyne_phase(cmb, (0.5, 0.5, 2.0)))
    assert swi[centre] <= abs(cmb[centre]) + 1e-6
    assert swi[centre] < 0.3 * np.median(swi)
    cmb_phase = _equatorial_ring_phase(cmb, cmb_affine, 3.0)
    calc_phase = _equatorial_ring_phase(calc, calc_affine, 3.0)
    assert abs(cmb_phase) > 0.05 and abs(calc_phase) > 0.05
    assert np.sign(cmb_phase) == -np.sign(calc_phase)


def test_swi_mask_darkens_only_negative_phase():
    magnitude = np.ones(4, np.float32)
    phase = np.array([-np.pi / 2, -0.1, 0.0, 1.0], np.float32)
    swi = physics.swi_magnitude(magnitude, phase, power=4)
    assert swi[0] == pytest.approx(0.5 ** 4)
    assert swi[1] < 1 and swi[2] == 1 and swi[3] == 1


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    scan = simulate_scan(seed=11, acquisition="gre15t", n_cmb=4)
    paths = write_scan(scan, tmp_path_factory.mktemp("sim"))
    return scan, paths


def test_every_truth_centre_lands_on_a_dark_voxel(simulated):
    scan, _ = simulated
    volume = scan.magnitude
    assert len(scan.truth["microbleeds"]) == 4
    for cmb in scan.truth["microbleeds"]:
        i, j, k = np.round(volume.ras_to_ijk(cmb["center_ras"])[0]).astype(int)
        spacing = volume.spacing
        ri, rj = int(8 / spacing[0]), int(8 / spacing[1])
        surroundings = np.median(volume.array[i - ri: i + ri + 1, j - rj: j + rj + 1, k])
        assert volume.array[i, j, k] < 0.6 * surroundings, cmb
        assert cmb["region"] in ("lobar", "deep", "infratentorial")
        assert 2.0 <= cmb["apparent_diameter_mm"] <= 10.0


def test_written_files_round_trip_affine_through_nibabel_and_simpleitk(simulated):
    scan, paths = simulated
    truth = json.loads(paths["truth"].read_text())
    assert truth["files"]["magnitude"] == paths["magnitude"].name
    through_nibabel = nib.load(str(paths["magnitude"]))
    np.testing.assert_allclose(through_nibabel.affine, scan.magnitude.affine, atol=1e-4)
    through_sitk = io.read_volume(paths["magnitude"])
    np.testing.assert_allclose(through_sitk.affine, scan.magnitude.affine, atol=1e-4)
    np.testing.assert_allclose(through_sitk.array, scan.magnitude.array, rtol=1e-5)
    phase = io.read_volume(paths["phase"]).array
    assert phase.min() >= -np.pi - 1e-5 and phase.max() <= np.pi + 1e-5


def test_scan_plan_spreads_acquisitions_and_cmb_free_scans():
    plan = scan_plan(9, seed=3, acquisition="mixed", cmb_free_fraction=0.34)
    assert {p[1] for p in plan} == {"swi3t", "gre3t", "gre15t"}
    assert sum(p[2] for p in plan) == 3
    assert len({p[0] for p in plan}) == 9
    assert plan == scan_plan(9, seed=3, acquisition="mixed", cmb_free_fraction=0.34)


def test_a_set_remakes_a_scan_it_plans_otherwise_than_the_one_on_disk(tmp_path):
    """Scan names carry seed and protocol, not "CMB-free": a set whose CMB-free scans fall elsewhere (another
    n or fraction) must not reuse a CMB-free scan where it plans microbleeds, nor the reverse."""
    spec = {"n": 2, "seed": 897, "acquisition": "gre15t", "cmb_free_fraction": 0.5, "mimic_level": 0.5}
    (magnitude,) = simulate_set(tmp_path, spec, limit=1)  # scan 0 is the CMB-free one of two
    truth_file = magnitude.with_name(magnitude.name.replace(".nii.gz", ".truth.json"))
    assert json.loads(truth_file.read_text())["microbleeds"] == []
    written = truth_file.stat().st_mtime_ns
    simulate_set(tmp_path, spec, limit=1)  # as planned: kept, not simulated again
    assert truth_file.stat().st_mtime_ns == written
    assert simulate_set(tmp_path, {**spec, "cmb_free_fraction": 0.0}, limit=1) == [magnitude]
    assert json.loads(truth_file.read_text())["microbleeds"]


def test_cmb_free_scan_has_no_microbleeds_but_keeps_mimics():
    scan = simulate_scan(seed=5, acquisition="gre3t", cmb_free=True, mimic_level=1.5)
    assert scan.truth["microbleeds"] == []
    assert len(scan.truth["mimics"]["veins"]) > 20
    assert scan.truth["mimics"]["iron_nuclei"]


@pytest.mark.parametrize("arguments, words", [
    (["--n", "0"], "--n must be at least 1"),
    (["--acquisition", "ct"], "unknown acquisition"),
    (["--cmb-free-fraction", "2"], "cmb-free-fraction"),
    (["--acquisition", "ood", "--site-seed", "4"], "--site-seed needs one protocol"),
])
def test_bad_synth_arguments_give_one_clear_line(tmp_path, arguments, words):
    result = subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli", "synth", "--out", str(tmp_path), *arguments],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- domains (simulate/domain.py)

def test_nominal_scans_carry_no_variation_and_write_their_true_brain_mask(simulated):
    scan, paths = simulated
    assert scan.truth["domain"] == "nominal" and "variation" not in scan.truth
    assert domain.sample_variation("gre15t", np.random.default_rng(0)) == domain.Variation()
    brain = nib.load(str(paths["brain"])).get_fdata() > 0.5
    assert brain.shape == scan.magnitude.shape and np.array_equal(brain, scan.brain)
    assert 1000 < brain.sum() * np.prod(scan.magnitude.spacing) / 1000 < 2600  # mL


def _draws(protocol, n=200):
    rng = np.random.default_rng(5)
    return [domain.sample_variation(protocol, rng) for _ in range(n)]


def test_held_out_settings_lie_outside_the_randomised_training_ranges():
    randomised = _draws(domain.RANDOMISED_PROTOCOL)
    held_out = _draws(domain.HELD_OUT_PROTOCOLS[0])

    def span(draws, field):
        values = np.array([np.ravel(getattr(d, field)) for d in draws], float)
        return values.min(axis=0), values.max(axis=0)

    for field in ("elastic_mm", "medullary_count", "cortical_count", "vein_chi_scale", "vein_turn", "bias_sd",
                  "noise_variation", "ghost", "homodyne_mm", "swi_power", "minip_slices", "lesion_parts"):
        train_low, train_high = span(randomised, field)
        test_low, test_high = span(held_out, field)
        assert np.all((test_low > train_high) | (test_high < train_low)), field
    assert all(d.gibbs_keep < 0.7 for d in held_out) and all(d.gibbs_keep >= 0.7 for d in randomised)
    assert all(d.vein_clearance_mm < 2.0 <= r.vein_clearance_mm for d, r in zip(held_out, randomised))
    for index in range(len(domain.TISSUES)):  # every tissue's contrast moves beyond the training range
        assert all(not 0.85 <= d.proton_density[index] <= 1.15 for d in held_out)
        assert all(not 0.8 <= d.r2star[index] <= 1.25 for d in held_out)


def test_held_out_acquisitions_are_ones_training_never_draws():
    rng = np.random.default_rng(3)
    randomised = [domain.sample_domain_acquisition(domain.RANDOMISED_PROTOCOL, rng) for _ in range(500)]
    assert not any(a.swi and a.b0_t == 1.5 for a in randomised)
    assert max(a.te_ms for a in randomised if a.b0_t == 3.0) <= 30
    assert max(a.spacing_mm[2] for a in randomised if a.b0_t == 3.0) <= 2.5
    assert max(a.spacing_mm[0] for a in randomised) <= 1.0
    held = {p: domain.sample_domain_acquisition(p, rng) for p in domain.HELD_OUT_PROTOCOLS}
    assert held["ood-swi15t"].swi and held["ood-swi15t"].b0_t == 1.5
    assert held["ood-gre3t-thick"].b0_t == 3.0 and held["ood-gre3t-thick"].spacing_mm[2] >= 3.0
    assert held["ood-gre15t-coarse"].spacing_mm[0] > 1.0 and held["ood-gre15t-coarse"].te_ms > 40


def test_ood_plan_cycles_the_held_out_protocols_and_random_is_a_protocol():
    plan = scan_plan(6, 3, "ood", 0.0)
    assert [protocol for _, protocol, _ in plan] == list(domain.HELD_OUT_PROTOCOLS) * 2
    assert {protocol for _, protocol, _ in scan_plan(4, 3, "random", 0.0)} == {"random"}


def test_a_randomised_scan_records_its_variation_and_stays_reproducible():
    first, again = simulate_scan(871, "random", n_cmb=3), simulate_scan(871, "random", n_cmb=3)
    assert first.truth["domain"] == "randomised" and first.truth["variation"]["domain"] == "randomised"
    assert np.array_equal(first.magnitude.array, again.magnitude.array)
    assert len(first.truth["microbleeds"]) == 3  # irregular lesions add parts, never extra truth lesions


def test_the_scans_of_a_site_share_its_acquisition_and_settings_and_differ_in_the_rest():
    site = dict(acquisition="ood-gre3t-thick", n_cmb=2, site_seed=4)
    first, second = simulate_scan(5101, **site), simulate_scan(5102, **site)
    acquisition, variation = domain.sample_site("ood-gre3t-thick", 4)
    for scan in (first, second):
        assert scan.truth["site_seed"] == 4
        assert scan.truth["acquisition"] == acquisition.to_dict()
        assert scan.truth["variation"] == variation.to_dict()
    assert first.truth["microbleeds"][0]["center_ras"] != second.truth["microbleeds"][0]["center_ras"]
    assert domain.sample_site("ood-gre3t-thick", 5) != (acquisition, variation)



def test_edge_share_places_microbleeds_against_the_brains_outer_surface():
    from scipy import ndimage

    from CMBDetectorLib.simulate import anatomy
    from CMBDetectorLib.simulate.synth import EDGE_MM

    scan = simulate_scan(seed=12, acquisition="gre3t", n_cmb=5, edge_share=1.0)
    head = anatomy.head_model()
    depth = ndimage.distance_transform_edt(head.brain)  # mm inside the brain, on the 1 mm template
    # deep tissue barely reaches the edge, so deep lesions keep their usual placement
    centres = np.array([m["center_mni"] for m in scan.truth["microbleeds"] if m["region"] != "deep"])
    voxels = np.round(head.to_ijk(centres)).astype(int)
    assert scan.truth["edge_share"] == 1.0 and len(centres) >= 3
    # a centre is drawn within half a voxel of an edge voxel, so within EDGE_MM + sqrt(3)/2 of the surface
    assert (depth[tuple(voxels.T)] <= EDGE_MM + 1.0).all(), depth[tuple(voxels.T)]


def test_soft_microbleed_is_a_smooth_dip_measured_at_half_its_contrast():
    from CMBDetectorLib.simulate.structures import MIN_CONTRAST, Sphere, apparent_diameter

    affine, shape = np.diag([1.0, 1.0, 1.0, 1.0]), (40, 40, 40)
    hard = Sphere("microbleed", np.array([20.2, 20.1, 20.3]), 3.0, 0.1, core_signal=0.0)
    soft = Sphere("microbleed", hard.centre, 3.0, 0.1, core_signal=0.0, soft_depth=0.6)
    _, hard_factors = sphere_voxel_factors(hard, affine, shape, 3.0, 0.02)
    _, soft_factors = sphere_voxel_factors(soft, affine, shape, 3.0, 0.02)
    assert np.abs(hard_factors).min() < 0.1  # the black core
    assert 0.4 <= np.abs(soft_factors).min() <= 1 - MIN_CONTRAST  # no core: 60 % deep, voxel-averaged
    # full width at half depth is about the sphere's diameter
    assert 2.0 <= apparent_diameter(soft, affine, shape, 3.0, 0.02) <= 4.0
    faint = Sphere("microbleed", hard.centre, 1.0, 0.1, core_signal=0.0, soft_depth=0.3)
    assert apparent_diameter(faint, affine, shape, 3.0, 0.02) == 0.0  # too faint to count as a microbleed


def test_soft_share_draws_soft_microbleeds_and_records_them():
    scan = simulate_scan(seed=12, acquisition="gre15t", n_cmb=4, soft_share=1.0)
    lesions = scan.truth["microbleeds"]
    assert scan.truth["soft_share"] == 1.0 and len(lesions) >= 3
    assert all(0.45 <= m["soft_depth"] <= 0.97 for m in lesions)
    magnitude = scan.magnitude.array
    level = np.median(magnitude[scan.brain])
    for lesion in lesions:  # each is a visible dip on the thick-slice grid, without a black core
        ijk = np.round(scan.magnitude.ras_to_ijk(np.array([lesion["center_ras"]]))[0]).astype(int)
        around = magnitude[tuple(slice(max(i - 1, 0), i + 2) for i in ijk)]
        assert around.min() < 0.85 * level, lesion
    assert "soft_share" not in simulate_scan(seed=12, acquisition="gre15t", n_cmb=1, cmb_free=True).truth


def test_half_contrast_sizing_keeps_a_faint_thick_slice_microbleed_the_darkness_rule_drops():
    from CMBDetectorLib.simulate.structures import Sphere, apparent_diameter

    affine, shape = np.diag([1.0, 1.0, 5.0, 1.0]), (40, 40, 12)  # 1.5 T GRE with 5 mm slices
    centre = np.array([20.3, 19.8, 28.0])  # 2 mm off the middle of its slice

    def sized(half_contrast_size):
        sphere = Sphere("microbleed", centre, 3.0, 0.3, core_signal=0.0, half_contrast_size=half_contrast_size)
        _, factors = sphere_voxel_factors(sphere, affine, shape, 1.5, 0.03)
        return 1 - np.abs(factors).min(), apparent_diameter(sphere, affine, shape, 1.5, 0.03)

    contrast, by_darkness = sized(False)
    assert 0.3 < contrast < 0.5  # a plainly visible grey dot, never half as dark as tissue
    assert by_darkness == 0.0
    _, by_half_contrast = sized(True)
    assert 2.0 <= by_half_contrast <= 5.0  # about its size, so it counts as a microbleed
    dark = Sphere("microbleed", np.array([20.3, 19.8, 25.0]), 5.0, 2.0, core_signal=0.0)  # black in its slice
    assert apparent_diameter(dark, affine, shape, 1.5, 0.03) == pytest.approx(  # a dark one: the same either way
        apparent_diameter(Sphere("microbleed", dark.centre, 5.0, 2.0, core_signal=0.0, half_contrast_size=True),
                          affine, shape, 1.5, 0.03))


def test_faint_synthesis_records_each_microbleeds_contrast():
    from CMBDetectorLib.simulate.structures import MIN_CONTRAST

    scan = simulate_scan(seed=881, acquisition="gre15t", n_cmb=8, faint=True)
    lesions = scan.truth["microbleeds"]
    assert scan.truth["faint"] is True and len(lesions) >= 6
    assert all(MIN_CONTRAST <= m["contrast"] <= 1.0 for m in lesions)
    assert min(m["contrast"] for m in lesions) < 0.5  # at least one the darkness rule would have dropped
    assert "faint" not in simulate_scan(seed=881, acquisition="gre15t", n_cmb=1, cmb_free=True).truth
