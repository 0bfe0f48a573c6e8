"""The job file of ``kind: embed`` (:mod:`engine.pipelines.embed`): its sections as
frozen dataclasses, each checked where it is parsed, so a wrong value is one line naming
its field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import SpecError
from engine.pipelines.spec import JobSpecBase, OutputSpec, TrackingSpec, TrainSpec

__all__ = ["SyntheticInputSpec", "EmbedInputSpec", "TileSpec", "TripletSpec", "EmbedSplitSpec",
           "EmbedModelSpec", "TripletLossSpec", "EmbedGridSpec", "ClusterSpec", "EmbedSpec"]


@dataclass(frozen=True)
class SyntheticInputSpec:
    """The seeded synthetic organisation fields (:func:`organisation_fields`)."""

    n_time: int = 16
    size: int = 128
    dx_km: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class EmbedInputSpec:
    """A catalog entry, or ``synthetic:`` fields (then ``catalog``/``entry`` stay empty)."""

    catalog: str = ""
    entry: str = ""
    chunks: dict[str, int] | None = None
    storage_options: dict[str, Any] | None = None
    dims: dict[str, str] | None = None
    synthetic: SyntheticInputSpec | None = None


@dataclass(frozen=True)
class TileSpec:
    """Tile size and the whole-domain grid's stride, in ``unit`` (``km`` or ``px``)."""

    size: float = 64.0
    unit: Literal["km", "px"] = "km"
    #: Step of the window grid; default: half a tile.
    stride: float | None = None


@dataclass(frozen=True)
class TripletSpec:
    #: Training triplets per epoch (new triplets each epoch) and validation triplets.
    n_train: int = 1024
    n_validation: int = 128
    #: Neighbour distance in km: one value, or [low, high] drawn per triplet.
    neighbour_km: list[float] = field(default_factory=lambda: [32.0])
    distant: Literal["other_time", "min_distance"] = "other_time"
    min_distance_km: float | None = None
    #: Random flips and quarter turns per tile.
    augment: bool = True
    #: A cube of at most this many MiB is read into memory once for the triplets;
    #: a larger one is read from its store batch by batch.
    cache_mib: float = 1024.0


@dataclass(frozen=True)
class EmbedSplitSpec:
    """Test time steps: listed, or the last ``test_fraction`` of the steps. An empty list
    holds nothing out (a single image: embed and cluster it, no scores)."""

    test_steps: list[int] | None = None
    test_fraction: float = 0.25


@dataclass(frozen=True)
class EmbedModelSpec:
    """``resnet18``: document 004's Tile2Vec network trained on triplets. ``autoencoder``:
    its alternative (section 11.2), a convolutional autoencoder trained to reconstruct
    tiles, whose bottleneck is the embedding; scored the same way."""

    architecture: Literal["resnet18", "autoencoder"] = "resnet18"
    #: Channels of the first stage (64: the published ResNet-18; the autoencoder's first
    #: convolution).
    width: int = 64
    stem: Literal["imagenet", "small"] = "imagenet"
    #: Embedding size (document 004: 100) and the head's hidden layer (resnet18).
    dim: int = 100
    hidden: int = 256
    dropout: float = 0.25
    #: Stride-2 stages of the autoencoder (the tile must divide by 2**depth).
    depth: int = 3
    #: A state_dict of this embedder (e.g. another run's best.pt) to start from.
    weights: str | None = None


@dataclass(frozen=True)
class TripletLossSpec:
    margin: float = 1.0
    distance: Literal["l2", "squared_l2"] = "l2"


@dataclass(frozen=True)
class EmbedGridSpec:
    #: Tiles per inference batch.
    batch_size: int = 256
    #: Other tile sizes (in ``tiles.unit``) embedded by the trained model for the
    #: NMI-vs-scale table.
    scales: list[float] = field(default_factory=list)
    #: ``shared``: the model trained at ``tiles.size`` embeds every scale (the ResNet pools
    #: globally, so any size goes through it). ``per_scale``: one model trained per scale
    #: on the same triplet recipe, neighbour distances scaled with the tile (document
    #: 004's scale experiment; the autoencoder's tile size is fixed, so it needs this).
    scale_models: Literal["shared", "per_scale"] = "shared"
    #: Rows of input per embedding task stay within this many MiB (one time step, a band
    #: of tile rows).
    band_mib: float = 64.0


@dataclass(frozen=True)
class ClusterSpec:
    #: Clusters of k-means (null: as many as the label classes, else 4).
    k: int | None = None
    n_boot: int = 200
    #: Threshold of ``cloud_fraction`` in the tile statistics.
    cloud_threshold: float = 0.15
    #: Ward hierarchical clustering (same k) on a subsample of this many training tiles,
    #: the rest by nearest centroid (``cluster_ward``), with a dendrogram; 0: none.
    ward_subsample: int = 2000


@dataclass(frozen=True)
class EmbedSpec(JobSpecBase):
    """A Tile2Vec embedding job: train on triplets, embed the domain, cluster, score."""

    name: str
    input: EmbedInputSpec
    output: OutputSpec
    #: Variables stacked as channels.
    variables: list[str] = field(default_factory=lambda: ["cloud"])
    #: A label variable, (time) or (time, y, x), to score clusters against; null: none.
    labels: str | None = None
    kind: Literal["embed"] = "embed"
    tiles: TileSpec = field(default_factory=TileSpec)
    triplets: TripletSpec = field(default_factory=TripletSpec)
    split: EmbedSplitSpec = field(default_factory=EmbedSplitSpec)
    model: EmbedModelSpec = field(default_factory=EmbedModelSpec)
    loss: TripletLossSpec = field(default_factory=TripletLossSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=10, batch_size=32,
                                                                learning_rate=1e-3,
                                                                patience=5))
    embed: EmbedGridSpec = field(default_factory=EmbedGridSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    seed: int = 0
    base_dir: str = "."

    def check(self) -> None:
        super().check()
        i = self.input
        if (i.synthetic is not None) == bool(i.catalog or i.entry):
            raise SpecError("input needs either catalog and entry, or synthetic: {...} "
                            "(not both)")
        if i.synthetic is not None:
            s = i.synthetic
            if not (1 <= s.n_time <= 10_000 and 16 <= s.size <= 8192 and s.dx_km > 0):
                raise SpecError("input.synthetic needs n_time in [1, 10000], size in "
                                f"[16, 8192] and dx_km > 0, got {s}")
        if not self.variables or len(set(self.variables)) != len(self.variables):
            raise SpecError(f"variables must list each channel once, got {self.variables}")
        if not self.tiles.size > 0:
            raise SpecError(f"tiles.size must be > 0, got {self.tiles.size}")
        if self.tiles.stride is not None and not self.tiles.stride > 0:
            raise SpecError(f"tiles.stride must be > 0, got {self.tiles.stride}")
        t = self.triplets
        if not (1 <= t.n_train <= 10_000_000 and 1 <= t.n_validation <= 1_000_000):
            raise SpecError("triplets.n_train and triplets.n_validation must be >= 1")
        if len(t.neighbour_km) not in (1, 2) or not all(v > 0 for v in t.neighbour_km) or \
                t.neighbour_km[0] > t.neighbour_km[-1]:
            raise SpecError(f"triplets.neighbour_km must be a distance > 0 or [low, high], "
                            f"got {t.neighbour_km}")
        if not t.cache_mib >= 0:
            raise SpecError(f"triplets.cache_mib must be >= 0, got {t.cache_mib}")
        if t.distant == "min_distance" and not (t.min_distance_km or 0) > 0:
            raise SpecError("triplets.distant: min_distance needs triplets.min_distance_km > 0")
        if not 0 < self.split.test_fraction < 1:
            raise SpecError(f"split.test_fraction must be in (0, 1), got "
                            f"{self.split.test_fraction}")
        m = self.model
        if not (1 <= m.dim <= 4096 and 1 <= m.width <= 256 and 1 <= m.hidden <= 8192
                and 0 <= m.dropout < 1):
            raise SpecError("model needs dim in [1, 4096], width in [1, 256], hidden in "
                            f"[1, 8192] and dropout in [0, 1), got {m}")
        if not self.loss.margin > 0:
            raise SpecError(f"loss.margin must be > 0, got {self.loss.margin}")
        if not 1 <= self.embed.batch_size <= 65536:
            raise SpecError(f"embed.batch_size must be in [1, 65536], got "
                            f"{self.embed.batch_size}")
        if any(not s > 0 for s in self.embed.scales):
            raise SpecError(f"embed.scales must be sizes > 0, got {self.embed.scales}")
        if not self.embed.band_mib > 0:
            raise SpecError(f"embed.band_mib must be > 0, got {self.embed.band_mib}")
        if m.architecture == "autoencoder":
            if not 1 <= m.depth <= 8:
                raise SpecError(f"model.depth must be in [1, 8], got {m.depth}")
            if self.embed.scales and self.embed.scale_models == "shared":
                raise SpecError("embed.scales with model autoencoder needs "
                                "embed.scale_models: per_scale (its tile size is fixed)")
        c = self.cluster
        if c.k is not None and not 2 <= c.k <= 1000:
            raise SpecError(f"cluster.k must be in [2, 1000], got {c.k}")
        if not 0 <= c.n_boot <= 10_000:
            raise SpecError(f"cluster.n_boot must be in [0, 10000], got {c.n_boot}")
        if not (c.ward_subsample == 0 or 2 <= c.ward_subsample <= 20_000):
            raise SpecError(f"cluster.ward_subsample must be 0 (no Ward) or in [2, 20000] "
                            f"(its memory grows with the square), got {c.ward_subsample}")
