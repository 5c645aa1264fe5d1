{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "regmirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: fullnameOverride, else the release name when it
already contains the chart name, else <release>-<chart>. Truncated to 63
characters (DNS label limit).
*/}}
{{- define "regmirror.fullname" -}}
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

{{- define "regmirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object of the release, without a component.
*/}}
{{- define "regmirror.baseLabels" -}}
helm.sh/chart: {{ include "regmirror.chart" . }}
app.kubernetes.io/name: {{ include "regmirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: regmirror
{{- end }}

{{/*
Labels of the operator's objects.
*/}}
{{- define "regmirror.labels" -}}
{{ include "regmirror.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of the node agents' objects.
*/}}
{{- define "regmirror.agentLabels" -}}
{{ include "regmirror.baseLabels" . }}
app.kubernetes.io/component: node-agent
{{- end }}

{{/*
Selector labels of the operator.
*/}}
{{- define "regmirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regmirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Selector labels of the node agents.
*/}}
{{- define "regmirror.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "regmirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "regmirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "regmirror.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The node agents' ServiceAccount.
*/}}
{{- define "regmirror.agentServiceAccountName" -}}
{{- required "agent.serviceAccount.name is required" .Values.agent.serviceAccount.name }}
{{- end }}

{{- define "regmirror.operatorImage" -}}
{{- printf "%s:%s" .Values.image.operator.repository (default .Chart.AppVersion .Values.image.operator.tag) }}
{{- end }}

{{- define "regmirror.cacheImage" -}}
{{- printf "%s:%s" .Values.image.cache.repository (default .Chart.AppVersion .Values.image.cache.tag) }}
{{- end }}

{{- define "regmirror.agentImage" -}}
{{- if .Values.agent.image.repository }}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- else }}
{{- include "regmirror.operatorImage" . }}
{{- end }}
{{- end }}

{{/*
KUBERNETES_SERVICE_HOST/PORT from apiServer, for clusters whose pods reach
the API server elsewhere than at the kubernetes Service's cluster IP; empty
when apiServer.host is unset (the kubelet's values). A list of env entries.
*/}}
{{/*
Fails the render on an apiServer.host with a port or brackets (an IPv6
address is written bare) or an apiServer.port that is not 1-65535.
*/}}
{{- define "regmirror.validateApiServer" -}}
{{- with .Values.apiServer.host }}
{{- $h := toString . }}
{{- if or (contains "[" $h) (contains "]" $h) (contains "/" $h) (contains " " $h) (eq (len (splitList ":" $h)) 2) }}
{{- fail (printf "apiServer.host: %q must be a host name or an IP address (IPv6 without brackets), without a port: set apiServer.port" $h) }}
{{- end }}
{{- $p := toString $.Values.apiServer.port }}
{{- if or (not (regexMatch "^[0-9]+$" $p)) (lt (atoi $p) 1) (gt (atoi $p) 65535) }}
{{- fail (printf "apiServer.port: %q must be a port number, 1-65535" $p) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "regmirror.apiServerEnv" -}}
{{- with .Values.apiServer.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $.Values.apiServer.port | toString | quote }}
{{- end }}
{{- end }}

