{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "deskvirt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: `<release>-<chart>`, or just the release name when it already
contains the chart name, or fullnameOverride. Cluster-scoped objects (ClusterRoles and their
bindings) carry it, so two releases never collide. Truncated to leave room for the longest
suffix ("-node-agent-admission", 20 characters) within the 63 characters of a label value.
*/}}
{{- define "deskvirt.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* `name-version` for the helm.sh/chart label. */}}
{{- define "deskvirt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "deskvirt.labels" -}}
helm.sh/chart: {{ include "deskvirt.chart" . }}
{{ include "deskvirt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deskvirt
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that identify the release; selectors add app.kubernetes.io/component. */}}
{{- define "deskvirt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deskvirt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Object names of the two components. */}}
{{- define "deskvirt.operator.fullname" -}}
{{- printf "%s-operator" (include "deskvirt.fullname" .) }}
{{- end }}
{{- define "deskvirt.nodeAgent.fullname" -}}
{{- printf "%s-node-agent" (include "deskvirt.fullname" .) }}
{{- end }}

{{/* `repository:tag` or `repository@digest` of an image; the tag defaults to appVersion. */}}
{{- define "deskvirt.image" -}}
{{- $image := .image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The console namespace: where the operator keeps the console password mirrors
(`console-<desktop uid>` Secrets) and the only namespace whose Secrets the node-agents can read.
consoles.namespace, else `<release namespace>-consoles`, so two releases never share one. It
must not be the release namespace (which holds the ServiceAccounts and, before Kubernetes 1.24,
their token Secrets) nor a namespace Kubernetes itself fills with ServiceAccounts and Secrets.
*/}}
{{- define "deskvirt.imagesNamespace" -}}
{{- $release := .Release.Namespace | default "default" }}
{{- .Values.images.namespace | default (printf "%s-images" $release) }}
{{- end }}

{{- define "deskvirt.consoleNamespace" -}}
{{- /* An empty release namespace (`helm lint` without --namespace) means `default`, as in Helm. */}}
{{- $release := .Release.Namespace | default "default" }}
{{- $ns := .Values.consoles.namespace | default (printf "%s-consoles" $release) }}
{{- if gt (len $ns) 63 }}
{{- fail (printf "the console namespace %q is longer than 63 characters: set consoles.namespace" $ns) }}
{{- end }}
{{- if eq $ns $release }}
{{- fail (printf "consoles.namespace must not be the release namespace %q: the node-agents can read every Secret of the console namespace, and the release namespace holds the ServiceAccounts (and, before Kubernetes 1.24, their token Secrets)" $ns) }}
{{- end }}
{{- if has $ns (list "default" "kube-system" "kube-public" "kube-node-lease") }}
{{- fail (printf "consoles.namespace must not be %q: the node-agents can read every Secret of the console namespace, so it must hold nothing but the console password mirrors" $ns) }}
{{- end }}
{{- $ns }}
{{- end }}

{{/*
A label map as key=value,key=value (sorted by key), for DESKVIRT_NODE_LABELS.
*/}}
{{- define "deskvirt.nodeLabels" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
A CEL test that `<root>.status.<path>` is set, parent by parent: celHasStatus (list "object"
"spice.port") gives has(object.status) && has(object.status.spice) && has(object.status.spice.port).
*/}}
{{- define "deskvirt.celHasStatus" -}}
{{- $at := printf "%s.status" (index . 0) -}}
{{- $out := list (printf "has(%s)" $at) -}}
{{- range splitList "." (index . 1) -}}
{{- $at = printf "%s.%s" $at . -}}
{{- $out = append $out (printf "has(%s)" $at) -}}
{{- end -}}
{{- join " && " $out -}}
{{- end }}
