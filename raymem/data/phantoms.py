"""Procedural phantom patients: raymem's embedded default data (no patient data ships with raymem).

A phantom patient is a fixed anatomy (body outline, organs, bones and a few lesions as superellipsoids
whose sizes, positions and angles are drawn per patient) plus a patient-specific fine texture field.
Every image of that patient is the same anatomy under a new pose (rotation within +-5 degrees, in-plane
for 3D plus +-3 degrees of tilt; shift within +-0.05 of the half field of view), contrast (gain, gamma,
offset, MR coil shading) and noise. Two images of one patient therefore share structure that two
patients do not, while global intensity says little about who the patient is (CT keeps calibrated HU).

Geometry uses normalised coordinates: [-1, 1] spans the field of view on every axis, in the arrays'
axis order, (y, x) in 2D and (z, y, x) in 3D. The field of view has the same length in mm on every
axis, so a rotation in normalised coordinates is a rigid rotation of the body even on the
anisotropic MR grid.

Kinds (arrays float32 in native units, spacing_mm per array axis):
  xray2d  chest radiograph, PA view (patient's left on the image right), (size, size), 12-bit
          detector values 0..4095 with bones bright, field of view 400 mm, modality "XR".
  ct3d    chest and upper abdomen, axial slices along z (superior first), (size, size, size),
          Hounsfield units (air -1000, fat -100, soft tissue 40, bone 700..1500), field of view
          400 mm, modality "CT".
  mri3d   knee, sagittal slices along z, (size // 4, size, size): slices 4x thicker than the
          in-plane pixels, as in clinical knee MR (MRNet); rows run superior to inferior, columns
          anterior to posterior; arbitrary positive intensities, field of view 160 mm, modality "MR".

Files (write_files): 16-bit PNG (xray2d), NIfTI .nii.gz (3D kinds; data in NIfTI's (x, y, z) order,
float32, affine diag(spacing)), or DICOM with realistic fake PHI for testing de-identification
(one file per 2D image; one series of slice files per 3D image).
"""

from __future__ import annotations

import datetime
import gzip
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The file writers' libraries (nibabel, pydicom, PIL, tqdm, and pyarrow through raymem.storage) are imported where
# files are written, so generating images in memory needs only numpy and scipy (benchmarks/gpu_reproduce.py).

KINDS = ("xray2d", "ct3d", "mri3d")
FILE_FORMATS = ("auto", "png", "nifti", "dicom")
MIN_SIZE = 16

MAX_ROTATION_DEG = 5.0  # each image within +-5 degrees of the canonical pose: two images differ by up to 10
MAX_TILT_DEG = 3.0  # 3D only: rotation about the two in-plane axes
MAX_SHIFT = 0.05  # normalised units per axis, about +-1.6 pixels at size 64
TEXTURE_CORRELATION_PX = 1.0  # Gaussian smoothing of the patient's white-noise texture, in pixels
ACQUIRE_CHUNK_VOXELS = 1 << 20  # images of a patient made together, bounding the temporaries (~25 MB coordinates)


@dataclass(frozen=True)
class PhantomImage:
    """One generated image of one phantom patient."""

    array: np.ndarray  # float32, native units, (H, W) or (D, H, W)
    spacing_mm: tuple[float, ...]  # per array axis
    modality: str  # "XR", "CT" or "MR"
    patient_index: int
    image_index: int


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Shape:
    """One piece of anatomy made of one tissue: the superellipsoid sum_j |u_j / semi_axes_j| ** exponents_j <= 1
    with u = rotation.T @ (x - centre), all in normalised coordinates of spatial_dims axes. A painted shape
    replaces what lies under it; an additive one adds its tissue's values (X-ray bones: attenuation adds up).
    Plain floats, not arrays: rendering does per-shape arithmetic in Python and keeps numpy for the voxels."""

    tissue: str
    centre: tuple[float, ...]  # (spatial_dims,)
    semi_axes: tuple[float, ...]  # (spatial_dims,)
    rotation: tuple[tuple[float, ...], ...]  # (spatial_dims, spatial_dims), row-major; column j is the shape's axis j
    exponents: tuple[float, ...]  # (spatial_dims,): 2 is an ellipsoid, larger is boxier
    additive: bool = False


def _rotation(angles_rad: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """Rotation matrix: one angle in 2D (the (y, x) plane); three in 3D, about z, y and x in turn.

    Returns (spatial_dims, spatial_dims), row-major."""
    planes = [(0, 1)] if len(angles_rad) == 1 else [(1, 2), (0, 2), (0, 1)]
    spatial_dims = 2 if len(angles_rad) == 1 else 3
    matrix = [[float(i == j) for j in range(spatial_dims)] for i in range(spatial_dims)]
    for (i, j), angle in zip(planes, angles_rad, strict=True):
        cos, sin = math.cos(angle), math.sin(angle)
        for row in matrix:  # right-multiplying by the rotation in plane (i, j) mixes columns i and j
            row[i], row[j] = cos * row[i] + sin * row[j], cos * row[j] - sin * row[i]
    return tuple(map(tuple, matrix))


def _shape(tissue: str, centre: Sequence[float], semi_axes: Sequence[float],
           angles_deg: Sequence[float] | None = None, exponents: float | Sequence[float] = 2.0,
           additive: bool = False) -> _Shape:
    """A _Shape from numbers or arrays; angles as in _rotation, in degrees (default: axis-aligned)."""
    spatial_dims = len(centre)
    angles_rad = [0.0] * (1 if spatial_dims == 2 else 3) if angles_deg is None else map(math.radians, angles_deg)
    exponents = (exponents,) * spatial_dims if isinstance(exponents, (int, float)) else exponents
    return _Shape(tissue, tuple(map(float, centre)), tuple(map(float, semi_axes)), _rotation(list(angles_rad)),
                  tuple(map(float, exponents)), additive)


def _inflated(shape: _Shape, tissue: str, margin: float) -> _Shape:
    """The same shape grown by `margin` (normalised units) on every semi-axis, made of `tissue`."""
    return _Shape(tissue, shape.centre, tuple(a + margin for a in shape.semi_axes), shape.rotation, shape.exponents,
                  shape.additive)


def _layered(bones: Sequence[_Shape], layers: Sequence[tuple[str, float]]) -> list[_Shape]:
    """Bones painted as nested shells, outermost first: layers are (tissue, margin), e.g. cartilage, cortex, marrow.
    Each layer is painted for every bone before the next, so neighbouring bones do not cover each other's inside."""
    return [_inflated(bone, tissue, margin) for tissue, margin in layers for bone in bones]


def _axis_coordinates(n: int) -> np.ndarray:
    """Normalised coordinates of the n voxel centres along one axis, (n,)."""
    return (2.0 * np.arange(n) + 1.0) / n - 1.0


def _render(shapes: Sequence[_Shape], tissues: dict[str, tuple[float, float]], background: str,
            grid_shape: tuple[int, ...]) -> np.ndarray:
    """Paint shapes in order, later ones covering earlier ones (or adding to them, for additive shapes), with edges
    antialiased over about a pixel. tissues maps a tissue name to (intensity, texture amplitude) in native units.

    Returns float32 (2, *grid_shape): the intensity map and the texture amplitude map."""
    spatial_dims = len(grid_shape)
    axes = [_axis_coordinates(n).astype(np.float32) for n in grid_shape]
    along_axis = [[-1 if k == i else 1 for k in range(spatial_dims)] for i in range(spatial_dims)]
    pixel = 2.0 / max(grid_shape)
    maps = np.empty((2, *grid_shape), np.float32)
    maps[0], maps[1] = tissues[background]
    values = {name: np.array(pair, np.float32).reshape(2, *[1] * spatial_dims) for name, pair in tissues.items()}
    for shape in shapes:
        # a superellipsoid lies inside its box of semi-axes, whose rotated extent along axis i is sum_j |R_ij| a_j;
        # voxel k of an axis with n voxels sits at (2 k + 1) / n - 1
        window = []
        for n, c, row in zip(grid_shape, shape.centre, shape.rotation, strict=True):
            reach = sum(abs(r) * a for r, a in zip(row, shape.semi_axes, strict=True)) + pixel
            window.append(slice(max(0, math.ceil(((c - reach + 1.0) * n - 1.0) / 2.0)),
                                min(n, math.floor(((c + reach + 1.0) * n - 1.0) / 2.0) + 1)))
        if any(w.start >= w.stop for w in window):
            continue
        offsets = [(axis[w] - c).reshape(along) for axis, w, c, along in zip(axes, window, shape.centre, along_axis)]
        level = 0.0
        for j, (semi_axis, exponent) in enumerate(zip(shape.semi_axes, shape.exponents, strict=True)):
            # Python floats times float32 arrays stay float32
            terms = [row[j] / semi_axis * offset for row, offset in zip(shape.rotation, offsets, strict=True)
                     if row[j] != 0.0]
            u_j = sum(terms[1:], terms[0])
            level = level + (u_j * u_j if exponent == 2.0 else np.abs(u_j) ** exponent)
        # near the surface, level ~ 1 + 2 d / a for a distance d outside: a ramp about a pixel wide
        ramp = min(shape.semi_axes) / (2.0 * pixel)
        coverage = np.minimum(np.maximum((0.5 + ramp) - ramp * level, 0.0), 1.0)
        painted = maps[(slice(None), *window)]
        painted += coverage * (values[shape.tissue] if shape.additive else values[shape.tissue] - painted)
    return maps


def _texture(rng: np.random.Generator, grid_shape: tuple[int, ...]) -> np.ndarray:
    """The patient's fine texture: white noise smoothed by a Gaussian of TEXTURE_CORRELATION_PX pixels
    (periodic, through the FFT), zero mean and unit standard deviation. Returns float32 of grid_shape."""
    white = rng.standard_normal(grid_shape, dtype=np.float32)
    frequencies = np.meshgrid(*[np.fft.fftfreq(n) for n in grid_shape[:-1]], np.fft.rfftfreq(grid_shape[-1]),
                              indexing="ij", sparse=True)
    gain = np.exp(-2.0 * np.pi**2 * TEXTURE_CORRELATION_PX**2 * sum(f**2 for f in frequencies))
    field = np.fft.irfftn(np.fft.rfftn(white) * gain, s=grid_shape, axes=range(len(grid_shape)))
    return ((field - field.mean()) / field.std()).astype(np.float32)


# ---------------------------------------------------------------- anatomy per kind


def _spots(rng: np.random.Generator, tissue: str, region: _Shape, count: int, radius_range: tuple[float, float],
           additive: bool = False) -> list[_Shape]:
    """`count` round lesions (nodules, cysts, bone islands) centred at uniform random points inside `region`:
    they make a patient recognisable the way real findings do."""
    spatial_dims = len(region.centre)
    spots = []
    for _ in range(count):
        direction = rng.standard_normal(spatial_dims)
        # a uniform point of the unit ball, stretched onto the region (the ellipsoid inside its superellipsoid)
        in_ball = direction / np.linalg.norm(direction) * rng.uniform() ** (1.0 / spatial_dims)
        centre = np.asarray(region.centre) + np.asarray(region.rotation) @ (np.asarray(region.semi_axes) * in_ball)
        spots.append(_shape(tissue, centre, [rng.uniform(*radius_range)] * spatial_dims, additive=additive))
    return spots


def _chest_radiograph(rng: np.random.Generator) -> list[_Shape]:
    """Chest PA radiograph in (y, x), patient's left on the image right: torso, neck, mediastinum, lungs, heart,
    then additive densities (nodules, vertebrae, ribs, clavicles) whose attenuation adds to what lies behind."""
    u = rng.uniform
    width = u(0.62, 0.92)  # half-width of the torso; lungs and ribs scale with it
    torso = _shape("soft", (u(0.1, 0.35), u(-0.06, 0.06)), (1.1, width), exponents=(2.0, u(2.5, 4.0)))
    mid_x = torso.centre[1]
    lungs = [_shape("lung", (u(-0.2, 0.02), mid_x + side * width * u(0.38, 0.46)),
                    (u(0.42, 0.66), width * u(0.28, 0.36)), angles_deg=[side * u(2.0, 14.0)],
                    exponents=(2.0, u(2.0, 3.0)))
             for side in (-1, 1)]
    shapes = [torso,
              _shape("soft", (-0.95, mid_x), (0.35, u(0.14, 0.24))),
              _shape("heart", (-0.3, mid_x), (0.6, u(0.07, 0.13))),
              *lungs,
              _shape("heart", (u(0.1, 0.35), mid_x + u(0.0, 0.2)), (u(0.16, 0.32), u(0.16, 0.34)),
                     angles_deg=[u(-40.0, 40.0)])]
    for lung in lungs:
        shapes += _spots(rng, "nodule", lung, int(rng.integers(0, 3)), (0.02, 0.05), additive=True)
    vertebra_height, vertebra_half_width = u(0.12, 0.17), u(0.055, 0.08)
    curve_amplitude, curve_phase = u(0.0, 0.08), u(0.0, 2 * np.pi)
    for y in np.arange(-1.0, 1.1, vertebra_height):
        shapes.append(_shape("spine", (y, mid_x + curve_amplitude * np.sin(2.0 * y + curve_phase)),
                             (0.4 * vertebra_height, vertebra_half_width), exponents=4.0, additive=True))
    rib_top, rib_spacing, rib_slope_deg, rib_half_thickness = u(-0.72, -0.56), u(0.1, 0.13), u(15, 30), u(0.02, 0.032)
    for side in (-1, 1):
        for rib in range(10):
            shapes.append(_shape("rib", (rib_top + rib * rib_spacing + u(-0.01, 0.01),
                                         mid_x + side * width * u(0.45, 0.5)),
                                 (rib_half_thickness, width * u(0.36, 0.42)),
                                 angles_deg=[-side * (rib_slope_deg + u(-3.0, 3.0))], additive=True))
        shapes.append(_shape("rib", (u(-0.75, -0.6), mid_x + side * width * u(0.32, 0.38)),  # clavicle
                             (0.03, width * u(0.3, 0.38)), angles_deg=[side * u(3.0, 18.0)], additive=True))
    return shapes


def _chest_abdomen_ct(rng: np.random.Generator) -> list[_Shape]:
    """Chest and upper abdomen CT in (z, y, x), z superior to inferior, y anterior to posterior, x patient right to
    left: fat and muscle walls, ribs, lungs with nodules, heart, aorta, liver with cysts, spleen, stomach, kidneys,
    bowel gas, vertebrae. Organs are placed relative to the body cavity, so they follow the body's size."""
    u = rng.uniform
    centre_y, centre_x = u(-0.1, 0.1), u(-0.08, 0.08)
    body_y, body_x, fat, muscle = u(0.42, 0.66), u(0.62, 0.9), u(0.03, 0.14), u(0.03, 0.07)
    cavity_y, cavity_x = body_y - fat - muscle, body_x - fat - muscle
    scale_y, scale_x = cavity_y / 0.45, cavity_x / 0.7  # organ layout below is for a 0.45 x 0.7 cavity

    def place(z: float, y: float, x: float) -> tuple[float, float, float]:
        return z, centre_y + scale_y * y, centre_x + scale_x * x

    def sized(z: float, y: float, x: float) -> tuple[float, float, float]:
        return z, scale_y * y, scale_x * x

    body_centre = (0.0, centre_y, centre_x)
    diaphragm_z = u(-0.1, 0.2)
    shapes = [
        _shape("fat", body_centre, (2.0, body_y, body_x), exponents=(8.0, 2.0, u(2.0, 2.6))),
        _shape("muscle", body_centre, (2.0, body_y - fat, body_x - fat), exponents=(8.0, 2.0, 2.0)),
    ]
    # ribs: thin slabs of bone across the body; the cavity painted over them leaves rings in the wall
    rib_spacing, rib_tilt_deg = u(0.15, 0.21), u(8.0, 22.0)
    for z in np.arange(u(-1.0, -0.9), diaphragm_z + 0.35, rib_spacing):
        shapes.append(_shape("cortical", (z, centre_y, centre_x),
                             (u(0.025, 0.035), cavity_y + 0.03, cavity_x + 0.03),
                             angles_deg=(0.0, 0.0, rib_tilt_deg + u(-3.0, 3.0))))
    shapes.append(_shape("soft", body_centre, (2.0, cavity_y, cavity_x), exponents=(8.0, 2.0, 2.0)))
    lungs = [_shape("lung", place((diaphragm_z - 1.1) / 2, u(-0.02, 0.08), side * u(0.3, 0.4)),
                    sized((diaphragm_z + 1.1) / 2, u(0.3, 0.4), u(0.24, 0.32)),
                    angles_deg=(side * u(-8.0, 8.0), 0.0, 0.0), exponents=(2.5, 2.0, 2.0))
             for side in (-1, 1)]
    liver = _shape("liver", place(diaphragm_z + u(0.25, 0.35), u(-0.05, 0.1), -u(0.22, 0.36)),
                   sized(u(0.28, 0.42), u(0.28, 0.38), u(0.32, 0.46)), angles_deg=(u(-20.0, 20.0), 0.0, 0.0))
    kidneys = [_shape("kidney", place(diaphragm_z + u(0.55, 0.72), u(0.22, 0.33), side * u(0.26, 0.38)),
                      sized(u(0.13, 0.19), u(0.08, 0.1), u(0.06, 0.08)), angles_deg=(side * u(5.0, 35.0), 0.0, 0.0))
               for side in (-1, 1)]
    stomach = _shape("soft", place(diaphragm_z + u(0.12, 0.28), u(-0.22, -0.02), u(0.18, 0.38)),
                     sized(u(0.1, 0.2), u(0.08, 0.16), u(0.1, 0.2)))
    shapes += [
        *lungs,
        _shape("blood", place(diaphragm_z - u(0.18, 0.32), u(-0.22, -0.08), u(0.02, 0.18)),
               sized(u(0.18, 0.3), u(0.18, 0.28), u(0.2, 0.32)), angles_deg=(u(-35.0, -5.0), 0.0, 0.0)),  # heart
        _shape("blood", place(0.0, u(0.18, 0.28), u(0.04, 0.14)), (2.0, *[u(0.045, 0.07)] * 2),
               exponents=(8.0, 2.0, 2.0)),  # aorta
        liver,
        _shape("spleen", place(diaphragm_z + u(0.18, 0.32), u(0.18, 0.32), u(0.42, 0.56)),
               sized(u(0.1, 0.2), u(0.09, 0.15), u(0.06, 0.1)), angles_deg=(u(-30.0, 30.0), 0.0, 0.0)),
        stomach,
        _shape("gas", np.subtract(stomach.centre, (0.0, 0.6 * stomach.semi_axes[1], 0.0)),
               np.multiply(stomach.semi_axes, (0.6, 0.4, 0.6))),
        *kidneys,
    ]
    for lung in lungs:
        shapes += _spots(rng, "nodule", lung, int(rng.integers(0, 4)), (0.02, 0.05))
    shapes += _spots(rng, "cyst", liver, int(rng.integers(0, 4)), (0.03, 0.08))
    for kidney in kidneys:
        shapes += _spots(rng, "cyst", kidney, int(rng.integers(0, 2)), (0.02, 0.05))
    for _ in range(rng.integers(2, 7)):
        shapes.append(_shape("gas", place(u(diaphragm_z + 0.4, 1.1), u(-0.4, 0.1), u(-0.55, 0.55)),
                             [u(0.03, 0.08)] * 3))  # bowel gas
    # the vertebral body sits in front of the canal and the spinous process, all inside the back muscles
    spine_radius, vertebra_height = u(0.08, 0.12), u(0.13, 0.18)
    spine_y = centre_y + body_y - fat - spine_radius - u(0.22, 0.26)
    canal_y = spine_y + spine_radius + 0.05
    shapes += [_shape("disc", (0.0, spine_y, centre_x), (2.0, spine_radius, 1.1 * spine_radius),
                      exponents=(8.0, 2.0, 2.0)),
               _shape("csf", (0.0, canal_y, centre_x), (2.0, 0.035, 0.035), exponents=(8.0, 2.0, 2.0))]
    vertebrae = []
    for z in np.arange(u(-1.1, -0.9), 1.1, vertebra_height):
        vertebrae += [_shape("cancellous", (z, spine_y, centre_x),
                             (0.38 * vertebra_height, spine_radius, 1.1 * spine_radius), exponents=(4.0, 2.0, 2.0)),
                      _shape("cancellous", (z, canal_y + 0.1, centre_x), (0.3 * vertebra_height, 0.06, 0.02),
                             angles_deg=(0.0, 0.0, u(-15.0, 15.0)))]
    return shapes + _layered(vertebrae, [("cortical", 0.015), ("cancellous", 0.0)])


def _knee_mr(rng: np.random.Generator) -> list[_Shape]:
    """Knee MR in (z, y, x), z medial-lateral (sagittal slices), y superior to inferior, x anterior to posterior:
    fat and muscle, joint fluid, popliteal vessel, femur, condyles, tibia and patella with marrow lesions,
    menisci, cruciate ligaments, patellar tendon. Bones are placed relative to the leg and the joint line."""
    u = rng.uniform
    leg_centre = (u(-0.08, 0.08), 0.0, u(-0.08, 0.08))
    leg_z, leg_x, fat = u(0.5, 0.8), u(0.8, 1.0), u(0.05, 0.16)
    bone_z, bone_x = leg_centre[0] + u(-0.05, 0.05), leg_centre[2] + u(-0.05, 0.1)
    joint_y = u(-0.05, 0.25)
    condyle_y_semi, plateau_y_semi = u(0.22, 0.34), u(0.24, 0.36)
    shapes = [
        _shape("fat", leg_centre, (leg_z, 2.0, leg_x), exponents=(2.0, 8.0, 2.0)),
        _shape("muscle", leg_centre, (leg_z - fat, 2.0, leg_x - fat), exponents=(2.0, 8.0, 2.0)),
        _shape("fluid", (bone_z + u(-0.1, 0.1), joint_y - u(0.5, 0.8), bone_x - u(0.45, 0.55)),
               (u(0.15, 0.35), u(0.06, 0.2), u(0.03, 0.07))),
        _shape("vessel", (bone_z + u(-0.1, 0.1), 0.0, bone_x + u(0.45, 0.55)), (u(0.04, 0.06), 2.0, u(0.04, 0.06)),
               exponents=(2.0, 8.0, 2.0)),
    ]
    if u() < 0.3:  # a popliteal (Baker's) cyst behind the joint
        shapes.append(_shape("fluid", (bone_z + u(-0.2, 0.2), joint_y + u(-0.2, 0.1), bone_x + u(0.4, 0.5)),
                             (u(0.08, 0.15), u(0.1, 0.2), u(0.06, 0.1))))
    # femoral and tibial shafts leave the joint at patient-specific angles in the sagittal plane
    shafts = []
    for direction, length, semi_axes in ((-1, 0.95, (u(0.18, 0.26), 0.8, u(0.15, 0.22))),
                                         (1, 1.0, (u(0.18, 0.26), 0.7, u(0.14, 0.2)))):
        angle_deg = u(-8.0, 8.0)
        offset = direction * length * np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
        shafts.append(_shape("marrow", (bone_z + u(-0.04, 0.04), joint_y + offset[0], bone_x + offset[1]), semi_axes,
                             angles_deg=(angle_deg, 0.0, 0.0), exponents=(2.0, 6.0, 2.0)))
    condyles = [_shape("marrow",
                       (bone_z + side * u(0.2, 0.32), joint_y - 0.05 - condyle_y_semi, bone_x + u(-0.02, 0.12)),
                       (u(0.16, 0.26), condyle_y_semi, u(0.28, 0.38)), angles_deg=(u(-12.0, 12.0), 0.0, 0.0))
                for side in (-1, 1)]
    plateau = _shape("marrow", (bone_z + u(-0.05, 0.05), joint_y + 0.05 + plateau_y_semi, bone_x + u(-0.04, 0.08)),
                     (u(0.45, 0.62), plateau_y_semi, u(0.28, 0.38)), exponents=(4.0, 4.0, 2.5))
    patella = _shape("marrow", (bone_z + u(-0.08, 0.08), joint_y - u(0.3, 0.5), bone_x - u(0.55, 0.7)),
                     (u(0.2, 0.32), u(0.16, 0.26), u(0.07, 0.12)), angles_deg=(u(-20.0, 20.0), 0.0, 0.0))
    articular = [*condyles, plateau, patella]
    shapes += _layered(articular, [("cartilage", 0.04)])
    shapes += _layered(shafts + articular, [("cortical", 0.02), ("marrow", 0.0)])
    for bone in [*condyles, plateau]:
        shapes += _spots(rng, "fluid", bone, int(rng.integers(0, 2)), (0.03, 0.07))
        shapes += _spots(rng, "cortical", bone, int(rng.integers(0, 2)), (0.02, 0.05))
    for side in (-1, 1):
        for x in (-0.25, 0.25):
            shapes.append(_shape("meniscus", (bone_z + side * u(0.22, 0.32), joint_y, bone_x + x + u(-0.04, 0.04)),
                                 (u(0.1, 0.18), 0.035, u(0.07, 0.13))))
    shapes += [
        _shape("ligament", (bone_z + u(-0.05, 0.05), joint_y - 0.1, bone_x + u(-0.05, 0.1)),
               (0.06, u(0.22, 0.32), 0.04), angles_deg=(u(25.0, 50.0), 0.0, 0.0)),  # anterior cruciate
        _shape("ligament", (bone_z + u(-0.05, 0.05), joint_y - 0.05, bone_x + u(0.1, 0.25)),
               (0.06, u(0.22, 0.32), 0.045), angles_deg=(-u(25.0, 50.0), 0.0, 0.0)),  # posterior cruciate
        _shape("ligament", (bone_z + u(-0.05, 0.05), patella.centre[1] + patella.semi_axes[1] + 0.25,
                            patella.centre[2] - 0.03),
               (u(0.12, 0.18), u(0.25, 0.3), 0.035), angles_deg=(u(-10.0, 10.0), 0.0, 0.0)),  # patellar tendon
    ]
    return shapes


# ---------------------------------------------------------------- acquisition


@dataclass(frozen=True)
class _Acquisition:
    """How one image is made from the patient's canonical map; each range is sampled uniformly per image.

    value = floor + scale * gain * shading * ((canonical - floor) / scale) ** gamma + offset, then noise, then clip.
    """

    floor: float  # canonical value that gain and gamma leave in place (air), native units
    scale: float  # native units that map to 1 before the gamma curve
    gain: tuple[float, float]
    gamma: tuple[float, float]
    offset: tuple[float, float]  # native units
    shading: float  # largest slope per axis, per normalised unit, of a linear multiplicative shading (receive coils)
    noise_sigma: tuple[float, float]  # native units
    rician: bool  # noise is the magnitude of complex Gaussian noise (MR); otherwise additive Gaussian
    value_range: tuple[float, float]  # native units


@dataclass(frozen=True)
class _Kind:
    """Everything that makes one phantom kind: grid, tissues, anatomy and acquisition."""

    modality: str
    spatial_dims: int
    field_of_view_mm: float
    slice_divisor: int  # the first axis has size // slice_divisor voxels (3D)
    tissues: dict[str, tuple[float, float]]  # name -> (intensity, texture amplitude), native units
    background: str
    anatomy: Callable[[np.random.Generator], list[_Shape]]
    acquisition: _Acquisition

    def grid_shape(self, size: int) -> tuple[int, ...]:
        return (size,) * self.spatial_dims if self.spatial_dims == 2 else (size // self.slice_divisor, size, size)

    def spacing_mm(self, size: int) -> tuple[float, ...]:
        return tuple(self.field_of_view_mm / n for n in self.grid_shape(size))


_KINDS = {
    "xray2d": _Kind(
        modality="XR", spatial_dims=2, field_of_view_mm=400.0, slice_divisor=1,
        tissues={"air": (0.0, 0.0), "soft": (1500.0, 60.0), "lung": (500.0, 120.0), "heart": (1800.0, 40.0),
                 "spine": (500.0, 80.0), "rib": (650.0, 80.0), "nodule": (700.0, 40.0)},  # last three: added
        background="air", anatomy=_chest_radiograph,
        acquisition=_Acquisition(floor=0.0, scale=4095.0, gain=(0.85, 1.15), gamma=(0.8, 1.25), offset=(0.0, 250.0),
                                 shading=0.0, noise_sigma=(20.0, 60.0), rician=False, value_range=(0.0, 4095.0))),
    "ct3d": _Kind(
        modality="CT", spatial_dims=3, field_of_view_mm=400.0, slice_divisor=1,
        tissues={"air": (-1000.0, 0.0), "gas": (-950.0, 20.0), "lung": (-850.0, 60.0), "fat": (-100.0, 15.0),
                 "muscle": (45.0, 10.0), "soft": (30.0, 10.0), "blood": (40.0, 6.0), "liver": (60.0, 10.0),
                 "spleen": (50.0, 8.0), "kidney": (35.0, 8.0), "nodule": (50.0, 10.0), "cyst": (5.0, 4.0),
                 "disc": (80.0, 10.0), "csf": (10.0, 5.0), "cancellous": (700.0, 80.0), "cortical": (1300.0, 60.0)},
        background="air", anatomy=_chest_abdomen_ct,
        acquisition=_Acquisition(floor=-1000.0, scale=1000.0, gain=(0.98, 1.02), gamma=(1.0, 1.0), offset=(-10.0, 10.0),
                                 shading=0.0, noise_sigma=(8.0, 25.0), rician=False, value_range=(-1024.0, 3071.0))),
    "mri3d": _Kind(
        modality="MR", spatial_dims=3, field_of_view_mm=160.0, slice_divisor=4,
        tissues={"air": (0.0, 0.0), "fat": (850.0, 60.0), "muscle": (280.0, 30.0), "marrow": (700.0, 70.0),
                 "cortical": (40.0, 5.0), "cartilage": (480.0, 30.0), "meniscus": (60.0, 10.0),
                 "ligament": (70.0, 10.0), "fluid": (950.0, 20.0), "vessel": (120.0, 20.0)},
        background="air", anatomy=_knee_mr,
        acquisition=_Acquisition(floor=0.0, scale=1000.0, gain=(0.5, 2.0), gamma=(0.85, 1.2), offset=(0.0, 0.0),
                                 shading=0.15, noise_sigma=(8.0, 25.0), rician=True, value_range=(0.0, np.inf))),
}


def _pose(rng: np.random.Generator, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """A random rigid pose: rotation (spatial_dims, spatial_dims) and shift (spatial_dims,) in normalised units."""
    if spatial_dims == 2:
        angles = [rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)]
    else:
        angles = [rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), *rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG, 2)]
    return np.array(_rotation(np.radians(angles))), rng.uniform(-MAX_SHIFT, MAX_SHIFT, spatial_dims)


def _warp(canonical: np.ndarray, rotations: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Resample the canonical map under each pose: image_k(x) = canonical(rotations[k] @ x + shifts[k]), linear
    interpolation, edges extended. canonical (*grid), rotations (K, d, d), shifts (K, d) -> (K, *grid) float32."""
    grid_shape, spatial_dims = canonical.shape, canonical.ndim
    positions = np.stack(np.meshgrid(*map(_axis_coordinates, grid_shape), indexing="ij")).reshape(spatial_dims, -1)
    # normalised coordinate y on an axis of n voxels is voxel index (y + 1) n / 2 - 0.5
    half = np.array(grid_shape) / 2.0
    index = (np.einsum("kij,jn->ikn", rotations * half[None, :, None], positions)
             + ((shifts + 1.0) * half - 0.5).T[:, :, None])
    warped = ndimage.map_coordinates(canonical, index.reshape(spatial_dims, -1), order=1, mode="nearest")
    return warped.reshape(len(rotations), *grid_shape)


def _acquire(canonical: np.ndarray, kind: _Kind, image_rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Images of one patient, all at once: pose, contrast and noise drawn from each image's own generator.

    canonical (*grid) native units -> (K, *grid) float32, K = len(image_rngs)."""
    acq, grid_shape = kind.acquisition, canonical.shape
    poses = [_pose(rng, kind.spatial_dims) for rng in image_rngs]
    rotations, shifts = (np.stack(parts) for parts in zip(*poses))
    images = _warp(canonical, rotations, shifts)

    broadcast = (-1,) + (1,) * kind.spatial_dims
    gain, gamma, offset, sigma = (np.array([rng.uniform(*r) for rng in image_rngs], np.float32).reshape(broadcast)
                                  for r in (acq.gain, acq.gamma, acq.offset, acq.noise_sigma))
    slopes = np.array([rng.uniform(-acq.shading, acq.shading, kind.spatial_dims) for rng in image_rngs], np.float32)
    positions = np.meshgrid(*[_axis_coordinates(n).astype(np.float32) for n in grid_shape], indexing="ij", sparse=True)
    shading = 1.0 + sum(slopes[:, i].reshape(broadcast) * positions[i] for i in range(kind.spatial_dims))
    relative = np.maximum(images - acq.floor, 0.0) / acq.scale
    clean = acq.floor + acq.scale * gain * shading * relative**gamma + offset

    noise_fields = 2 if acq.rician else 1  # real and imaginary parts for Rician noise
    noise = np.stack([rng.standard_normal((noise_fields, *grid_shape), dtype=np.float32) for rng in image_rngs])
    noisy = np.hypot(clean + sigma * noise[:, 0], sigma * noise[:, 1]) if acq.rician else clean + sigma * noise[:, 0]
    return np.clip(noisy, *acq.value_range).astype(np.float32)


# ---------------------------------------------------------------- generation


def _patient_seeds(seed: int, patient_index: int) -> list[np.random.SeedSequence]:
    """(anatomy, images, record) seed sequences of one patient, the same whatever the number of patients."""
    return np.random.SeedSequence(seed, spawn_key=(patient_index,)).spawn(3)


def _check_arguments(kind: str, patients: int, images_per_patient: int, size: int, seed: int) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}: choose one of {', '.join(KINDS)}")
    for name, value in (("patients", patients), ("images_per_patient", images_per_patient)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def generate(kind: str, *, patients: int, images_per_patient: int, size: int, seed: int) -> Iterator[PhantomImage]:
    """Phantom images, patient by patient, image_index 0..images_per_patient-1 within each patient.

    The same (kind, seed, patient index) always gives the same anatomy whatever `patients` and
    `images_per_patient` are, and the same image k whatever `patients` is and for any images_per_patient > k,
    so nested subsets are stable. Arrays are float32 of the kind's grid shape (see the module docstring).
    Arguments are checked here, before the first image."""
    _check_arguments(kind, patients, images_per_patient, size, seed)
    return _generate(_KINDS[kind], patients, images_per_patient, size, seed)


def _generate(kind: _Kind, patients: int, images_per_patient: int, size: int, seed: int) -> Iterator[PhantomImage]:
    grid_shape, spacing_mm = kind.grid_shape(size), kind.spacing_mm(size)
    chunk = max(1, ACQUIRE_CHUNK_VOXELS // math.prod(grid_shape))
    for patient_index in range(patients):
        anatomy_seed, images_seed, _ = _patient_seeds(seed, patient_index)
        anatomy_rng = np.random.default_rng(anatomy_seed)
        intensity, texture_amplitude = _render(kind.anatomy(anatomy_rng), kind.tissues, kind.background, grid_shape)
        canonical = intensity + texture_amplitude * _texture(anatomy_rng, grid_shape)
        image_rngs = [np.random.default_rng(s) for s in images_seed.spawn(images_per_patient)]
        for first in range(0, images_per_patient, chunk):
            for image_index, array in enumerate(_acquire(canonical, kind, image_rngs[first:first + chunk]), first):
                yield PhantomImage(array, spacing_mm, kind.modality, patient_index, image_index)


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class _DicomStorage:
    """How a modality's values are stored in DICOM: stored = round(value - intercept) as dtype (slope 1)."""

    sop_class_uid: str
    modality: str  # DICOM's term
    dtype: type
    bits_stored: int
    intercept: float
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, then column direction


_DICOM = {
    # Digital X-Ray Image Storage - For Presentation
    "XR": _DicomStorage("1.2.840.10008.5.1.4.1.1.1.1", "DX", np.uint16, 12, 0.0, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
    # CT Image Storage, axial slices
    "CT": _DicomStorage("1.2.840.10008.5.1.4.1.1.2", "CT", np.int16, 16, -1024.0,
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
    # MR Image Storage, sagittal slices: rows run posterior, columns inferior
    "MR": _DicomStorage("1.2.840.10008.5.1.4.1.1.4", "MR", np.uint16, 16, 0.0, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class _PatientRecord:
    """Fake PHI of one phantom patient, realistic enough to test de-identification."""

    name: str
    patient_id: str
    birth_date: datetime.date
    sex: str
    first_study: datetime.date
    days_between_studies: int


def _patient_record(seed: int, patient_index: int) -> _PatientRecord:
    rng = np.random.default_rng(_patient_seeds(seed, patient_index)[2])
    return _PatientRecord(
        name=f"PHANTOM^PATIENT{patient_index:04d}", patient_id=f"PHID-{seed}-{patient_index:06d}",
        birth_date=datetime.date(1930, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 70 * 365))),
        sex=str(rng.choice(["F", "M"])),
        first_study=datetime.date(2015, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 8 * 365))),
        days_between_studies=int(rng.integers(7, 120)))


def _encode_png(image: PhantomImage) -> bytes:
    """16-bit grayscale PNG of a 2D image, values rounded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.rint(image.array).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_nifti(image: PhantomImage) -> bytes:
    """Gzipped NIfTI-1 of a 3D image: data float32 in NIfTI's (x, y, z) order, affine diag(spacing x, y, z)."""
    import nibabel as nib

    spacing_xyz = image.spacing_mm[::-1]
    nifti = nib.Nifti1Image(np.ascontiguousarray(image.array.transpose()), np.diag([*spacing_xyz, 1.0]))
    nifti.header.set_xyzt_units("mm")
    nifti.set_qform(nifti.affine, code=1)
    nifti.set_sform(nifti.affine, code=1)
    return gzip.compress(nifti.to_bytes(), mtime=0)


def _encode_dicom(image: PhantomImage, kind: str, seed: int, record: _PatientRecord) -> list[bytes]:
    """DICOM files with fake PHI, Explicit VR Little Endian: one per 2D image, one per slice of a 3D image.

    One study and one series per image (each image is a separate visit); UIDs are generate_uid hashes of
    (kind, seed, patient, image, element), so rewriting the same phantoms gives the same files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dicom = _DICOM[image.modality]
    slices = image.array.reshape(-1, *image.array.shape[-2:])
    row_spacing, column_spacing = image.spacing_mm[-2:]
    slice_spacing = image.spacing_mm[0] if image.array.ndim == 3 else None
    row_direction, column_direction = np.array(dicom.orientation[:3]), np.array(dicom.orientation[3:])
    normal = np.cross(row_direction, column_direction)
    origin = -0.5 * (slices.shape[2] * column_spacing * row_direction + slices.shape[1] * row_spacing * column_direction
                     + len(slices) * (slice_spacing or 0.0) * normal)
    study_date = record.first_study + datetime.timedelta(days=image.image_index * record.days_between_studies)
    age_years = (study_date - record.birth_date).days // 365
    stored = np.clip(np.rint(slices - dicom.intercept), np.iinfo(dicom.dtype).min, np.iinfo(dicom.dtype).max)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["raymem-phantom", kind, str(seed), str(image.patient_index),
                                          str(image.image_index), *map(str, parts)])

    files = []
    for z, pixels in enumerate(stored.astype(dicom.dtype)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = dicom.sop_class_uid
        meta.MediaStorageSOPInstanceUID = uid("instance", z)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
        ds.PatientName, ds.PatientID, ds.PatientSex = record.name, record.patient_id, record.sex
        ds.PatientBirthDate, ds.PatientAge = record.birth_date.strftime("%Y%m%d"), f"{age_years:03d}Y"
        ds.InstitutionName, ds.InstitutionAddress = "Phantom General Hospital", "1 Phantom Street, Nowhere"
        ds.ReferringPhysicianName, ds.OperatorsName = "PHANTOM^REFERRER", "PHANTOM^OPERATOR"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
        ds.AccessionNumber = f"ACC{seed:04d}{image.patient_index:06d}{image.image_index:03d}"
        ds.StudyID = str(image.image_index + 1)
        ds.Modality, ds.Manufacturer, ds.StudyDescription = dicom.modality, "raymem phantoms", f"phantom {kind}"
        ds.SeriesNumber, ds.InstanceNumber = 1, z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageOrientationPatient = list(dicom.orientation)
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + z * (slice_spacing or 0.0) * normal]
        ds.PixelSpacing = [row_spacing, column_spacing]
        if slice_spacing is not None:
            ds.SliceThickness = ds.SpacingBetweenSlices = slice_spacing
            ds.SliceLocation = round(float(np.dot(ds.ImagePositionPatient, normal)), 4)
        else:
            ds.ImagerPixelSpacing = [row_spacing, column_spacing]
            ds.PresentationIntentType = "FOR PRESENTATION"
        ds.RescaleSlope, ds.RescaleIntercept = 1, dicom.intercept
        ds.set_pixel_data(pixels, "MONOCHROME2", dicom.bits_stored, generate_instance_uid=False)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def write_files(dst: str, kind: str, *, patients: int, images_per_patient: int, size: int, seed: int,
                file_format: str = "auto", progress: bool = True) -> int:
    """Write phantom images as real files under dst (a local path or s3:// URI); returns the number of files.

    Layout: <dst>/patient-PPPP/img-KKK.<png|nii.gz|dcm>, or for 3D DICOM one series per image,
    <dst>/patient-PPPP/img-KKK/slice-ZZZZ.dcm. file_format: "png" (xray2d), "nifti" (3D kinds),
    "dicom" (all kinds), "auto" (png for xray2d, nifti for 3D). A tqdm bar counts images when progress."""
    from tqdm import tqdm

    from raymem import storage

    images = generate(kind, patients=patients, images_per_patient=images_per_patient, size=size, seed=seed)
    if file_format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {file_format!r}: choose one of {', '.join(FILE_FORMATS)}")
    spatial_dims = _KINDS[kind].spatial_dims
    file_format = {"auto": "png" if spatial_dims == 2 else "nifti"}.get(file_format, file_format)
    if (file_format, spatial_dims) in (("png", 3), ("nifti", 2)):
        raise ValueError(f"{file_format} does not fit {kind} images: use {'nifti' if spatial_dims == 3 else 'png'}"
                         " or dicom")
    written = 0
    for image in tqdm(images, total=patients * images_per_patient, unit="image", desc=f"phantom {kind} files",
                      disable=not progress):
        patient_dir = storage.join(dst, f"patient-{image.patient_index:04d}")
        name = f"img-{image.image_index:03d}"
        if file_format == "dicom":
            files = _encode_dicom(image, kind, seed, _patient_record(seed, image.patient_index))
            paths = ([storage.join(patient_dir, f"{name}.dcm")] if spatial_dims == 2 else
                     [storage.join(patient_dir, name, f"slice-{z:04d}.dcm") for z in range(len(files))])
        else:
            extension, encode = {"png": ("png", _encode_png), "nifti": ("nii.gz", _encode_nifti)}[file_format]
            files, paths = [encode(image)], [storage.join(patient_dir, f"{name}.{extension}")]
        for path, data in zip(paths, files, strict=True):
            storage.write_bytes(path, data)
        written += len(files)
    return written
