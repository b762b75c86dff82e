"""A synthetic Sen12MS-format source whose tiles have land-cover structure, not noise.

Each tile is a map of a few land-cover classes (smooth blobs). Every class has its own Sentinel-2
spectrum, texture and Sentinel-1 backscatter, so the optical and radar views of a tile agree with
each other and with the class map. This gives self-supervised training something real to learn and
lets a linear probe on the dominant class measure it, without downloading any imagery.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from rsdino.data.bands import S2_BANDS_SEN12MS, S2_LAYOUTS
from rsdino.data.seasonal import SeasonalViews


@dataclass(frozen=True)
class LandCoverClass:
    """Archetype of one class, as L1C reflectance x10000 in Sen12MS band order and SAR in dB.

    `peak_spectrum`/`peak_sar_db` describe the class at the height of the growing season; classes
    without phenology use the same values for both.
    """

    name: str
    spectrum: tuple[float, ...]
    peak_spectrum: tuple[float, ...]
    sar_db: tuple[float, float]
    peak_sar_db: tuple[float, float]
    texture_amplitude: float
    texture_cells: int


def _static_class(
    name: str,
    spectrum: tuple[float, ...],
    sar_db: tuple[float, float],
    texture_amplitude: float,
    texture_cells: int,
) -> LandCoverClass:
    return LandCoverClass(
        name, spectrum, spectrum, sar_db, sar_db, texture_amplitude, texture_cells
    )


# Bands:            B1    B2    B3    B4    B5    B6    B7    B8    B8A   B9    B10  B11   B12
LAND_COVER_CLASSES: tuple[LandCoverClass, ...] = (
    # Water: dark beyond the green band, nearly black in SWIR; specular, so SAR is very dark.
    _static_class(
        "water",
        (1350, 1100, 900, 650, 520, 430, 400, 360, 340, 130, 10, 150, 100),
        (-21.0, -28.0),
        texture_amplitude=0.03,
        texture_cells=3,
    ),
    # Dense forest: red edge and high NIR; canopy volume scattering keeps VH high.
    _static_class(
        "forest",
        (1250, 950, 850, 620, 1000, 2200, 2650, 2750, 2900, 900, 15, 1550, 780),
        (-7.5, -13.5),
        texture_amplitude=0.08,
        texture_cells=12,
    ),
    # Cropland: tilled soil out of season, green canopy at the seasonal peak (day-of-year driven).
    LandCoverClass(
        "cropland",
        spectrum=(1450, 1350, 1450, 1650, 1850, 2000, 2100, 2200, 2300, 750, 18, 2900, 2300),
        peak_spectrum=(1300, 1000, 1050, 700, 1250, 2700, 3300, 3500, 3600, 1150, 15, 2000, 1050),
        sar_db=(-12.0, -21.0),
        peak_sar_db=(-10.0, -15.5),
        texture_amplitude=0.10,
        texture_cells=4,
    ),
    # Bare soil: reflectance rising towards SWIR; smooth surface, so low cross-polarised return.
    _static_class(
        "bare_soil",
        (1550, 1500, 1700, 2000, 2150, 2300, 2400, 2500, 2600, 850, 20, 3300, 2700),
        (-13.5, -23.0),
        texture_amplitude=0.08,
        texture_cells=6,
    ),
    # Urban: flat, bright spectrum with fine-grained texture; double bounce makes SAR bright.
    _static_class(
        "urban",
        (1750, 1650, 1700, 1800, 1900, 2050, 2150, 2250, 2300, 720, 25, 2550, 2250),
        (-4.0, -11.0),
        texture_amplitude=0.22,
        texture_cells=24,
    ),
    # Grassland: moderate vegetation signal, brighter in SWIR than forest.
    _static_class(
        "grassland",
        (1350, 1100, 1150, 1000, 1450, 2150, 2450, 2550, 2700, 880, 15, 2400, 1550),
        (-10.5, -17.5),
        texture_amplitude=0.06,
        texture_cells=8,
    ),
    # Wetland: a vegetation/water mixture, darker than dry vegetation everywhere.
    _static_class(
        "wetland",
        (1280, 1000, 920, 720, 900, 1450, 1650, 1700, 1760, 520, 12, 900, 520),
        (-13.0, -19.0),
        texture_amplitude=0.10,
        texture_cells=5,
    ),
)

# Additive path radiance of a fully hazy tile: scattering is strongest at short wavelengths.
_HAZE_PROFILE = np.array(
    [700, 600, 480, 360, 300, 250, 220, 200, 190, 80, 5, 70, 40], dtype=np.float32
)
_SENSOR_NOISE_FLOOR = 15.0  # reflectance x10000
_SENSOR_NOISE_RELATIVE = 0.01
_SPECKLE_LOOKS = 4.5  # equivalent number of looks of Sentinel-1 GRD
_MAX_CLASSES_PER_TILE = 4
_UINT16_MAX = float(np.iinfo(np.uint16).max)
# The world (class spectra of a seed) gets its own random stream, separate from the per-sample
# streams default_rng([seed, index]) for every index.
_WORLD_STREAM = 1


@lru_cache(maxsize=64)
def _smooth_interpolation_matrix(cells: int, size: int) -> np.ndarray:
    """[size, cells + 1] weights that resample a coarse lattice onto `size` pixels.

    Smoothstep weights instead of linear ones avoid visible creases at lattice lines.
    """
    position = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
    left = np.minimum(np.floor(position).astype(np.int64), cells - 1)
    frac = position - left
    weight_right = frac * frac * (3.0 - 2.0 * frac)
    matrix = np.zeros((size, cells + 1), dtype=np.float32)
    rows = np.arange(size)
    matrix[rows, left] = 1.0 - weight_right
    matrix[rows, left + 1] = weight_right
    return matrix


def _smooth_fields(rng: np.random.Generator, count: int, cells: int, size: int) -> np.ndarray:
    """`count` smooth random fields [count, size, size] with about `cells` blobs across a side."""
    lattice = rng.standard_normal((count, cells + 1, cells + 1), dtype=np.float32)
    interpolation = _smooth_interpolation_matrix(cells, size)
    return interpolation @ lattice @ interpolation.T


@dataclass(frozen=True)
class _World:
    """Everything that is fixed per seed: the classes and their perturbed signatures."""

    spectrum: np.ndarray  # [K, 13] off-season
    peak_spectrum: np.ndarray  # [K, 13]
    sar_db: np.ndarray  # [K, 2]
    peak_sar_db: np.ndarray  # [K, 2]
    texture_amplitude: np.ndarray  # [K]
    texture_cells: tuple[int, ...]
    season_peak_doy: float
    season_width_days: float
    dominance: float = 0.0  # added to one present class's field: > 0 makes tiles scenes


def _make_world(seed: int, classes: tuple[LandCoverClass, ...]) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_WORLD_STREAM,)))
    spectral_jitter = np.exp(0.05 * rng.standard_normal((len(classes), 13))).astype(np.float32)
    sar_jitter = rng.normal(0.0, 0.8, size=(len(classes), 2)).astype(np.float32)
    texture_jitter = rng.uniform(0.8, 1.25, size=len(classes)).astype(np.float32)
    return _World(
        spectrum=np.array([c.spectrum for c in classes], dtype=np.float32) * spectral_jitter,
        peak_spectrum=np.array([c.peak_spectrum for c in classes], dtype=np.float32)
        * spectral_jitter,
        sar_db=np.array([c.sar_db for c in classes], dtype=np.float32) + sar_jitter,
        peak_sar_db=np.array([c.peak_sar_db for c in classes], dtype=np.float32) + sar_jitter,
        texture_amplitude=np.array([c.texture_amplitude for c in classes], dtype=np.float32)
        * texture_jitter,
        texture_cells=tuple(c.texture_cells for c in classes),
        season_peak_doy=float(rng.uniform(150.0, 220.0)),
        season_width_days=float(rng.uniform(40.0, 70.0)),
    )


# Texture of the two members of a texture pair: amplitude and lattice cells across the tile.
_SMOOTH_TEXTURE = (0.03, 3)
_COARSE_TEXTURE = (0.4, 4)  # grain of 1/4 of the tile: several patches wide, it survives crops
# How far the paired world's main class of a tile leads the others' fields: about 4% of tiles are
# near ties (the top two classes within 10 points of cover) against 16-18% in the default world.
_SCENE_DOMINANCE = 1.5


def _texture_paired(world: _World) -> _World:
    """Class 2j + 1 takes class 2j's spectra and backscatter; 2j is smooth, 2j + 1 coarse.

    Its tiles are scenes, one class covering most of the tile (as in EuroSAT), so the dominant
    class a probe is scored on is rarely a near tie that no feature could settle.
    """
    signatures = {
        name: getattr(world, name).copy()
        for name in ("spectrum", "peak_spectrum", "sar_db", "peak_sar_db")
    }
    amplitude = world.texture_amplitude.copy()
    cells = list(world.texture_cells)
    for k in range(len(cells)):
        for array in signatures.values():
            array[k] = array[k - k % 2]
        amplitude[k], cells[k] = _COARSE_TEXTURE if k % 2 else _SMOOTH_TEXTURE
    return _World(
        **signatures,
        texture_amplitude=amplitude,
        texture_cells=tuple(cells),
        season_peak_doy=world.season_peak_doy,
        season_width_days=world.season_width_days,
        dominance=_SCENE_DOMINANCE,
    )


def _greenness(doy: int, peak_doy: float, width_days: float) -> float:
    """Seasonal vegetation vigour in [0, 1]: a bump around the peak, periodic over the year."""
    distance = abs(doy - peak_doy)
    distance = min(distance, 365.0 - distance)
    return float(np.exp(-0.5 * (distance / width_days) ** 2))


class SyntheticLandCover(torch.utils.data.Dataset):
    """Sen12MS-format samples of a synthetic world; sample `i` depends only on (seed, i + offset).

    Samples are {"s1": float32 [2, H, W] VV/VH in dB, "s2": uint16 [C, H, W] reflectance x10000
    (C = 13 for "sen12ms", 9 for "satlas"), "doy": day of year, "key": str, "label": dominant
    class, "landcover": uint8 [H, W] class map}. `index_offset` draws other tiles of the same world
    (same seed, same class signatures), e.g. for a held-out split. `texture_pairs` makes classes
    2j and 2j + 1 share one signature and differ only in texture, in tiles that one class mostly
    covers (`SyntheticConfig`).
    """

    def __init__(
        self,
        num_samples: int,
        tile_size: int = 64,
        num_classes: int = 6,
        s2_layout: str = "sen12ms",
        seed: int = 0,
        index_offset: int = 0,
        texture_pairs: bool = False,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        if not 1 <= num_classes <= len(LAND_COVER_CLASSES):
            raise ValueError(
                f"num_classes must be in 1..{len(LAND_COVER_CLASSES)}, got {num_classes}"
            )
        if s2_layout not in S2_LAYOUTS:
            raise ValueError(
                f"unknown s2_layout {s2_layout!r}; expected one of {sorted(S2_LAYOUTS)}"
            )
        if index_offset < 0:
            raise ValueError(f"index_offset must be >= 0, got {index_offset}")
        self.num_samples = num_samples
        self.tile_size = tile_size
        self.num_classes = num_classes
        self.s2_layout = s2_layout
        self.seed = seed
        self.index_offset = index_offset
        self.classes = LAND_COVER_CLASSES[:num_classes]
        self.texture_pairs = texture_pairs
        self._world = _make_world(seed, self.classes)
        if texture_pairs:
            self._world = _texture_paired(self._world)
            self.class_names = tuple(
                f"{self.classes[k - k % 2].name}_{'coarse' if k % 2 else 'smooth'}"
                for k in range(num_classes)
            )
        else:
            self.class_names = tuple(c.name for c in self.classes)
        self._s2_band_indices = np.array(
            [S2_BANDS_SEN12MS.index(name) for name in S2_LAYOUTS[s2_layout]]
        )
        self.seasonal: SeasonalViews | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        world_index = self.index_offset + int(index)
        rng = np.random.default_rng([self.seed, world_index])
        doy = int(rng.integers(1, 366))
        landcover = self._land_cover_map(rng)
        texture_gain = self._texture_gain(rng, landcover)
        s2, s1 = self._acquisition(rng, landcover, texture_gain, doy)
        counts = np.bincount(landcover.ravel(), minlength=self.num_classes)
        key = f"synthetic/seed{self.seed}/{world_index:06d}"
        sample = {
            "s1": s1,
            "s2": s2,
            "doy": doy,
            "key": key,
            "label": int(counts.argmax()),
            "landcover": landcover,
        }
        if self.seasonal is not None:
            sample.update(self._second_date(world_index, landcover, texture_gain, doy, key))
        return sample

    def enable_seasonal_views(self, views: SeasonalViews) -> None:
        """Serve each tile a second time, ``min_days_apart``..``max_days_apart`` days later in
        the season: the same land cover and texture, the season's spectra and backscatter, and
        that date's own illumination, haze and noise (``*_b`` fields, ``days_apart``)."""
        if views.min_days_apart < 1:  # a second date the same day would be the first again
            raise ValueError(f"need min_days_apart >= 1, got {views.min_days_apart}")
        self.seasonal = views

    @property
    def samples_with_second_date(self) -> int:
        return self.num_samples if self.seasonal is not None else 0

    def _acquisition(
        self, rng: np.random.Generator, landcover: np.ndarray, texture_gain: np.ndarray, doy: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """S2 (in the layout's bands) and S1 of one date of a tile."""
        greenness = _greenness(doy, self._world.season_peak_doy, self._world.season_width_days)
        s2 = self._optical(rng, landcover, texture_gain, greenness)
        s1 = self._radar(rng, landcover, texture_gain, greenness)
        return s2[self._s2_band_indices], s1

    def _second_date(
        self,
        world_index: int,
        landcover: np.ndarray,
        texture_gain: np.ndarray,
        doy: int,
        key: str,
    ) -> dict:
        """Another date of the tile, drawn from its own stream (the first date's is untouched)."""
        views = self.seasonal
        rng = np.random.default_rng([self.seed, world_index, views.seed, 1])
        gap = int(rng.integers(views.min_days_apart, views.max_days_apart + 1))
        doy_b = (doy - 1 + gap) % 365 + 1
        s2_b, s1_b = self._acquisition(rng, landcover, texture_gain, doy_b)
        return {"s1_b": s1_b, "s2_b": s2_b, "doy_b": doy_b, "key_b": key, "days_apart": gap}

    def _land_cover_map(self, rng: np.random.Generator) -> np.ndarray:
        """A few classes as blobs: argmax over one smooth random field per present class."""
        num_present = int(rng.integers(1, min(_MAX_CLASSES_PER_TILE, self.num_classes) + 1))
        present = rng.choice(self.num_classes, size=num_present, replace=False)
        blob_cells = int(rng.integers(2, 7))  # few large regions .. many small ones
        fields = _smooth_fields(rng, num_present, blob_cells, self.tile_size)
        fields += 0.5 * _smooth_fields(rng, num_present, 2 * blob_cells, self.tile_size)
        # A per-class bias varies the class proportions between tiles; the world's dominance
        # favours the first class drawn.
        bias = rng.normal(0.0, 0.5, size=(num_present, 1, 1)).astype(np.float32)
        bias[0] += self._world.dominance
        fields += bias
        return present[fields.argmax(axis=0)].astype(np.uint8)

    def _texture_gain(self, rng: np.random.Generator, landcover: np.ndarray) -> np.ndarray:
        """Per-pixel multiplicative texture [H, W], with each class's own amplitude and grain."""
        texture = np.zeros(landcover.shape, dtype=np.float32)
        for class_id in np.unique(landcover):
            cells = self._world.texture_cells[class_id]
            field = _smooth_fields(rng, 1, cells, self.tile_size)[0]
            inside = landcover == class_id
            texture[inside] = self._world.texture_amplitude[class_id] * field[inside]
        return np.clip(1.0 + texture, 0.2, None)

    def _optical(
        self,
        rng: np.random.Generator,
        landcover: np.ndarray,
        texture_gain: np.ndarray,
        greenness: float,
    ) -> np.ndarray:
        """13-band uint16 reflectance: class spectra, texture, then per-tile nuisance and noise."""
        world = self._world
        spectra = world.spectrum + greenness * (world.peak_spectrum - world.spectrum)
        reflectance = spectra.T[:, landcover] * texture_gain
        # Nuisance that shifts the whole tile: illumination, a small calibration tilt per band,
        # and haze (mostly clear tiles, a few very hazy ones).
        illumination = rng.uniform(0.85, 1.15)
        band_gain = 1.0 + 0.03 * rng.standard_normal(13, dtype=np.float32)
        haze = rng.uniform(0.0, 1.0) ** 2 * _HAZE_PROFILE
        reflectance = reflectance * (illumination * band_gain)[:, None, None]
        reflectance += haze[:, None, None]
        # Zero-mean uniform noise with the wanted std: its shape does not matter here and it is
        # several times cheaper to draw than Gaussian noise, which would dominate the tile's cost.
        noise_std = _SENSOR_NOISE_FLOOR + _SENSOR_NOISE_RELATIVE * reflectance
        unit_noise = rng.random(reflectance.shape, dtype=np.float32) - 0.5
        reflectance += (np.sqrt(12.0, dtype=np.float32) * noise_std) * unit_noise
        return np.rint(np.clip(reflectance, 0.0, _UINT16_MAX)).astype(np.uint16)

    def _radar(
        self,
        rng: np.random.Generator,
        landcover: np.ndarray,
        texture_gain: np.ndarray,
        greenness: float,
    ) -> np.ndarray:
        """VV/VH in dB: class backscatter, texture, a per-tile calibration offset, and speckle."""
        world = self._world
        backscatter = world.sar_db + greenness * (world.peak_sar_db - world.sar_db)
        sar_db = backscatter.T[:, landcover] + 10.0 * np.log10(texture_gain)
        sar_db += rng.normal(0.0, 0.7)  # incidence angle / calibration differences between scenes
        # Speckle is multiplicative in linear power: gamma distributed with unit mean.
        speckle = rng.standard_gamma(_SPECKLE_LOOKS, size=sar_db.shape, dtype=np.float32)
        sar_db += 10.0 * np.log10(speckle / _SPECKLE_LOOKS)
        return sar_db.astype(np.float32)
