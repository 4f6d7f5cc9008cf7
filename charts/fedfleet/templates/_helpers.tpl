{{/*
Names, labels and the Redis wiring shared by every template.
Kubernetes names are DNS labels of at most 63 characters: every name is cut to leave room for
its suffix, and a trailing "-" left by the cut is removed.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "fedfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's resource name prefix: fullnameOverride, else "<release>-<name>", else just the
release name when it already contains the chart name.
*/}}
{{- define "fedfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "fedfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "fedfleet.labels" -}}
helm.sh/chart: {{ include "fedfleet.chart" . }}
{{ include "fedfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedfleet
{{- end }}

{{/*
Selector labels; templates add app.kubernetes.io/component (operator, redis, test), so they
never select an FLJob's own pods (components coordinator, selector, aggregator).
*/}}
{{- define "fedfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Operator Deployment, Service and RBAC objects: "<fullname>-operator" (<= 63). */}}
{{- define "fedfleet.operator.fullname" -}}
{{- printf "%s-operator" (include "fedfleet.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "fedfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedfleet.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image, tag defaulting to the chart's appVersion. */}}
{{- define "fedfleet.operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Bundled Redis StatefulSet, Service and Secret: "<fullname>-redis", at most 52 characters
because a StatefulSet's controller-revision-hash label is "<name>-<10 characters>" (<= 63).
*/}}
{{- define "fedfleet.redis.fullname" -}}
{{- printf "%s-redis" (include "fedfleet.fullname" . | trunc 46 | trimSuffix "-") }}
{{- end }}

{{/* True (non-empty) when the chart runs its own Redis. */}}
{{- define "fedfleet.redis.bundled" -}}
{{- if not .Values.redis.external.url }}true{{ end }}
{{- end }}

{{/*
Prefix of the environment variables Kubernetes sets in every pod for a Service that exists
when the pod starts: Service "a-b-redis" -> A_B_REDIS_SERVICE_HOST / A_B_REDIS_SERVICE_PORT.
*/}}
{{- define "fedfleet.serviceEnvPrefix" -}}
{{- . | upper | replace "-" "_" }}
{{- end }}

{{- define "fedfleet.redis.serviceEnvPrefix" -}}
{{- include "fedfleet.serviceEnvPrefix" (include "fedfleet.redis.fullname" .) }}
{{- end }}

{{- define "fedfleet.operator.serviceEnvPrefix" -}}
{{- include "fedfleet.serviceEnvPrefix" (include "fedfleet.operator.fullname" .) }}
{{- end }}

{{/*
FEDFLEET_STORE_URL. The bundled Redis is addressed through the Service's environment
variables, expanded by the kubelet ($(VAR) in env values), not through its DNS name:
- it works without cluster DNS (the fedfleet test cluster has none, and neither do some
  minimal clusters);
- the operator copies this URL verbatim into every FLJob's actors, which may run in other
  namespaces, where the short Service name would not resolve; the ClusterIP works everywhere.
The Service is created before the Deployment (Helm's install order), so its variables exist
when the operator's pod starts; enableServiceLinks is set explicitly on that pod.
*/}}
{{- define "fedfleet.storeURL" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- else }}
{{- $p := include "fedfleet.redis.serviceEnvPrefix" . }}
{{- printf "redis://$(%s_SERVICE_HOST):$(%s_SERVICE_PORT)/0" $p $p }}
{{- end }}
{{- end }}

{{/* Secret holding the Redis password; empty for an external Redis without a password. */}}
{{- define "fedfleet.redis.secretName" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.existingSecret }}
{{- else if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else }}
{{- include "fedfleet.redis.fullname" . }}
{{- end }}
{{- end }}

{{/* Key of the password in that Secret. */}}
{{- define "fedfleet.redis.secretKey" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.existingSecretPasswordKey }}
{{- else if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else -}}
redis-password
{{- end }}
{{- end }}

{{/* env entry FEDFLEET_REDIS_PASSWORD, always a secretKeyRef (never a literal). */}}
{{- define "fedfleet.redis.passwordEnv" -}}
{{- with include "fedfleet.redis.secretName" . -}}
- name: FEDFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "fedfleet.redis.secretKey" $ }}
{{- end }}
{{- end }}

{{/* Pod- and container-level hardening shared by the operator and the test pod. */}}
{{- define "fedfleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
fsGroup: 65534
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "fedfleet.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Where the ServiceMonitor and PodMonitor look for FLJob actors: the operator's watched
namespaces, or every namespace when it watches all.
*/}}
{{- define "fedfleet.monitoring.namespaceSelector" -}}
namespaceSelector:
{{- if .Values.operator.watchNamespaces }}
  matchNames:
    {{- toYaml .Values.operator.watchNamespaces | nindent 4 }}
{{- else }}
  any: true
{{- end }}
{{- end }}

{{/*
Target labels from the actor pods' labels: the FLJob's name and the actor's role (fedfleet_
prefixed, since Prometheus' own "job" label names the scrape configuration).
*/}}
{{- define "fedfleet.monitoring.relabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_fedfleet_dev_job]
  targetLabel: fedfleet_job
- sourceLabels: [__meta_kubernetes_pod_label_fedfleet_dev_role]
  targetLabel: fedfleet_role
{{- end }}
