{{- define "fracture.labels" -}}
app.kubernetes.io/name: fracture
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
