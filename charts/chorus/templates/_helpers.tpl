{{/* The release's base name: the release name alone when it already says "chorus". */}}
{{- define "chorus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The operator's objects (Deployment, ServiceAccount, RBAC, Service, Lease). */}}
{{- define "chorus.operator.name" -}}
{{- printf "%s-operator" (include "chorus.fullname" .) -}}
{{- end -}}

{{- define "chorus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: chorus
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of the operator pods: stable across upgrades (a Deployment selector is immutable). */}}
{{- define "chorus.operator.selectorLabels" -}}
app.kubernetes.io/name: chorus-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* chorus.labels already carries app.kubernetes.io/instance; a repeated key is invalid YAML. */}}
{{- define "chorus.operator.labels" -}}
{{ include "chorus.labels" . }}
app.kubernetes.io/name: chorus-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "chorus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
