"""Typed shapes of the Kubernetes objects the operator writes.

Only the fields the builders set are declared: enough for mypy to catch a misspelt key or a
string where Kubernetes wants an int, without vendoring the whole API. The bodies are plain
dicts at run time, which is what the Kubernetes client and :func:`kopf.adopt` take.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

__all__ = [
    "ChildBody",
    "ConfigMapBody",
    "Container",
    "ContainerPort",
    "DeploymentBody",
    "DeploymentSpec",
    "EnvVar",
    "EnvVarSource",
    "FieldRef",
    "HTTPGetAction",
    "KeyRef",
    "KeyToPath",
    "LabelSelector",
    "ObjectMeta",
    "PodSecurityContext",
    "PodSpec",
    "PodTemplate",
    "Probe",
    "ResourceRequirements",
    "SecretBody",
    "SecretVolumeSource",
    "SecurityContext",
    "ServiceBody",
    "ServicePort",
    "ServiceSpec",
    "TemplateMeta",
    "Volume",
    "VolumeMount",
]


class ObjectMeta(TypedDict):
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: NotRequired[dict[str, str]]


class TemplateMeta(TypedDict):
    labels: dict[str, str]
    annotations: dict[str, str]


class KeyRef(TypedDict):
    name: str
    key: str


class FieldRef(TypedDict):
    fieldPath: str


class EnvVarSource(TypedDict, total=False):
    configMapKeyRef: KeyRef
    secretKeyRef: KeyRef
    fieldRef: FieldRef


class EnvVar(TypedDict):
    name: str
    value: NotRequired[str]
    valueFrom: NotRequired[EnvVarSource]


class HTTPGetAction(TypedDict):
    path: str
    port: int
    scheme: NotRequired[Literal["HTTP", "HTTPS"]]


class Probe(TypedDict):
    httpGet: HTTPGetAction
    periodSeconds: int
    timeoutSeconds: int
    failureThreshold: int


class SecurityContext(TypedDict):
    runAsNonRoot: bool
    runAsUser: int
    readOnlyRootFilesystem: bool
    allowPrivilegeEscalation: bool
    capabilities: dict[Literal["drop", "add"], list[str]]


class ContainerPort(TypedDict):
    name: str
    containerPort: int
    protocol: Literal["TCP", "UDP"]


class ResourceRequirements(TypedDict, total=False):
    requests: dict[str, str]
    limits: dict[str, str]


class VolumeMount(TypedDict):
    name: str
    mountPath: str
    readOnly: NotRequired[bool]


class KeyToPath(TypedDict):
    key: str
    path: str


class SecretVolumeSource(TypedDict):
    secretName: str
    defaultMode: int
    items: list[KeyToPath]


class Volume(TypedDict):
    name: str
    emptyDir: NotRequired[dict[str, str]]
    configMap: NotRequired[dict[str, str]]
    persistentVolumeClaim: NotRequired[dict[str, str | bool]]
    secret: NotRequired[SecretVolumeSource]


class Container(TypedDict):
    name: str
    image: str
    imagePullPolicy: str
    command: list[str]
    env: list[EnvVar]
    ports: list[ContainerPort]
    startupProbe: Probe
    readinessProbe: Probe
    livenessProbe: Probe
    securityContext: SecurityContext
    resources: ResourceRequirements
    volumeMounts: list[VolumeMount]


class PodSecurityContext(TypedDict):
    fsGroup: int


class PodSpec(TypedDict):
    automountServiceAccountToken: bool
    containers: list[Container]
    volumes: list[Volume]
    securityContext: NotRequired[PodSecurityContext]


class PodTemplate(TypedDict):
    metadata: TemplateMeta
    spec: PodSpec


class LabelSelector(TypedDict):
    matchLabels: dict[str, str]


class DeploymentSpec(TypedDict):
    replicas: int
    revisionHistoryLimit: int
    selector: LabelSelector
    template: PodTemplate


class DeploymentBody(TypedDict):
    apiVersion: Literal["apps/v1"]
    kind: Literal["Deployment"]
    metadata: ObjectMeta
    spec: DeploymentSpec


class ServicePort(TypedDict):
    name: str
    port: int
    targetPort: int
    protocol: Literal["TCP", "UDP"]


class ServiceSpec(TypedDict):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"]
    selector: dict[str, str]
    ports: list[ServicePort]
    sessionAffinity: NotRequired[Literal["ClientIP", "None"]]


class ServiceBody(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["Service"]
    metadata: ObjectMeta
    spec: ServiceSpec


class ConfigMapBody(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["ConfigMap"]
    metadata: ObjectMeta
    data: dict[str, str]


class SecretBody(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["Secret"]
    metadata: ObjectMeta
    type: Literal["Opaque"]
    data: dict[str, str]
    """Values base64-encoded, as the API stores them (``stringData`` confuses field ownership
    and reads back as ``data`` anyway)."""


ChildBody = ConfigMapBody | SecretBody | DeploymentBody | ServiceBody
