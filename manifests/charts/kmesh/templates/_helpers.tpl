{{/* Name of the DaemonSet and ServiceAccount: what Istio's tooling calls ztunnel. */}}
{{- define "kmesh.name" -}}
{{ .Values.resourceName | default "ztunnel" }}
{{- end }}

{{/* The image, as Istio's charts build it: `image` as-is when it holds a "/". */}}
{{- define "kmesh.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub }}/{{ .Values.image | default "kmesh" }}:{{ .Values.tag }}
{{- end }}
{{- end }}

{{/* istiod's address for xDS and the CA, honouring a revision like ztunnel's chart. */}}
{{- define "kmesh.istiod" -}}
istiod{{ with .Values.revision }}-{{ . }}{{ end }}.{{ .Values.istioNamespace }}.svc:15012
{{- end }}

{{/* Labels on every object. app and app.kubernetes.io/name are what Istio's
tooling and dashboards select; part-of says which data plane it is. */}}
{{- define "kmesh.labels" -}}
app: ztunnel
app.kubernetes.io/name: ztunnel
app.kubernetes.io/part-of: kmesh
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kmesh.annotations" -}}
{{- $a := deepCopy (.Values.annotations | default dict) -}}
{{- with .Values.revision }}{{ $_ := set $a "istio.io/rev" . }}{{ end -}}
{{- if $a }}
annotations:
  {{- toYaml $a | nindent 2 }}
{{- end }}
{{- end }}
