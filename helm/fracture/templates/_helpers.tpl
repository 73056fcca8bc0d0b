{{/* Names, labels and the rendering of fracture.toml. */}}

{{- define "fracture.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fracture.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", within the 63 characters a name may have. */}}
{{- define "fracture.component" -}}
{{- printf "%s-%s" (include "fracture.fullname" .root | trunc (int (sub 62 (len .name)))) .name | trimSuffix "-" -}}
{{- end -}}

{{- define "fracture.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fracture.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fracture.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fracture.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fracture
{{- end -}}

{{- define "fracture.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "fracture.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fracture.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fracture.secretName" -}}
{{- if .Values.secrets.name -}}
{{- .Values.secrets.name -}}
{{- else if .Values.secrets.create -}}
{{- include "fracture.component" (dict "root" . "name" "secrets") -}}
{{- else -}}
{{- fail "secrets.name: the Secret holding the de-identification key and the audit database URL (or secrets.create: true)" -}}
{{- end -}}
{{- end -}}

{{- define "fracture.storeIsS3" -}}
{{- if hasPrefix "s3://" (trim .Values.store.url) }}true{{ end -}}
{{- end -}}

{{- define "fracture.storeClaim" -}}
{{- default (include "fracture.component" (dict "root" . "name" "store")) .Values.store.persistence.existingClaim -}}
{{- end -}}

{{- define "fracture.edgeClaim" -}}
{{- default (include "fracture.component" (dict "root" . "name" "ingest-edge")) .Values.ingest.edge.persistence.existingClaim -}}
{{- end -}}

{{/* Paths inside the container (the image's layout). */}}
{{- define "fracture.configDir" -}}/etc/fracture/config{{- end -}}
{{- define "fracture.secretDir" -}}/etc/fracture/secret{{- end -}}
{{- define "fracture.edgeDir" -}}/var/lib/fracture/edge{{- end -}}
{{- define "fracture.dicomTlsDir" -}}/etc/fracture/dicom-tls{{- end -}}
{{- define "fracture.exportTlsDir" -}}/etc/fracture/pacs-tls{{- end -}}
{{- define "fracture.spoolDir" -}}/var/lib/fracture/spool{{- end -}}
{{- define "fracture.auditDir" -}}/var/lib/fracture/audit{{- end -}}

{{/* Every StatefulSet's stage: the five, and the export to the PACS when enabled (a JSON list). */}}
{{- define "fracture.stages" -}}
{{- $stages := list "ingest" "preprocess" "ensemble" "postprocess" "audit" -}}
{{- if .Values.export.enabled -}}
{{- $stages = append $stages "export" -}}
{{- end -}}
{{- toJson $stages -}}
{{- end -}}

{{/* The stages whose replicas follow their consumer lag or CPU. */}}
{{- define "fracture.autoscaled" -}}
{{- if and (has .stage (list "preprocess" "ensemble")) (or .root.Values.keda.enabled .root.Values.autoscaling.enabled) -}}true{{- end -}}
{{- end -}}

{{/*
fracture.toml as a dict: what the chart derives from its values, with `config` merged over it.
Only keys the binary knows: every section struct says deny_unknown_fields.
*/}}
{{- define "fracture.configDict" -}}
{{- $v := .Values -}}
{{- $kafka := dict "brokers" (required "kafka.brokers: the bootstrap servers of your Kafka cluster" $v.kafka.brokers) "topic_prefix" $v.kafka.topicPrefix "partitions" $v.kafka.partitions "replication" $v.kafka.replication "extra" (default dict $v.kafka.extra) -}}
{{- range $key, $name := dict "timeoutMs" "timeout_ms" "transactionTimeoutMs" "transaction_timeout_ms" "maxPollIntervalMs" "max_poll_interval_ms" "sessionTimeoutMs" "session_timeout_ms" -}}
{{- if not (kindIs "invalid" (index $v.kafka $key)) -}}
{{- $_ := set $kafka $name (index $v.kafka $key) -}}
{{- end -}}
{{- end -}}
{{- $storeUrl := ternary (trim $v.store.url) "/data/store" (not (empty (trim $v.store.url))) -}}
{{- $store := dict "url" $storeUrl "endpoint" $v.store.endpoint -}}
{{- $telemetry := dict "log" $v.logLevel "json" $v.logJson "metrics_addr" (printf "0.0.0.0:%d" (int $v.metrics.port)) "otlp_endpoint" $v.otlpEndpoint -}}
{{- $model := dict "manifest" $v.model.manifest "device" $v.model.device -}}
{{- $scp := dict "listen" "" "ae_title" $v.ingest.dicom.aeTitle "spool" (include "fracture.spoolDir" .) "max_associations" $v.ingest.dicom.maxAssociations -}}
{{- if $v.ingest.dicom.enabled -}}
{{- $_ := set $scp "listen" (printf "0.0.0.0:%d" (int $v.ingest.dicom.containerPort)) -}}
{{- end -}}
{{- if $v.ingest.dicom.tls.enabled -}}
{{- $_ := required "ingest.dicom.tls.existingSecret: a kubernetes.io/tls Secret (tls.crt, tls.key; ca.crt for client certificates)" $v.ingest.dicom.tls.existingSecret -}}
{{- $_ := set $scp "tls_cert_file" (printf "%s/tls.crt" (include "fracture.dicomTlsDir" .)) -}}
{{- $_ := set $scp "tls_key_file" (printf "%s/tls.key" (include "fracture.dicomTlsDir" .)) -}}
{{- if $v.ingest.dicom.tls.requireClientCertificates -}}
{{- $_ := set $scp "tls_client_ca_file" (printf "%s/ca.crt" (include "fracture.dicomTlsDir" .)) -}}
{{- end -}}
{{- end -}}
{{- $ingest := dict "key_file" (printf "%s/deid.key" (include "fracture.secretDir" .)) "site_code" $v.ingest.siteCode "uid_root" (toString $v.ingest.uidRoot) "quarantine" (printf "%s/quarantine" (include "fracture.edgeDir" .)) "linkage" (printf "%s/linkage/linkage.db" (include "fracture.edgeDir" .)) "scp" $scp -}}
{{- if $v.ingest.input.existingClaim -}}
{{- $_ := set $ingest "input_dir" $v.ingest.input.mountPath -}}
{{- end -}}
{{- $audit := dict "dashboard_addr" "" -}}
{{- if $v.audit.dashboard.enabled -}}
{{- $_ := set $audit "dashboard_addr" (printf "0.0.0.0:%d" (int $v.audit.dashboard.port)) -}}
{{- end -}}
{{- $cfg := dict "kafka" $kafka "store" $store "telemetry" $telemetry "model" $model "ingest" $ingest "audit" $audit -}}
{{- if $v.export.enabled -}}
{{- $e := $v.export -}}
{{- $export := dict "pacs" (required "export.pacs: the PACS to send results to, AE_TITLE@host:port" $e.pacs) "calling_ae_title" $e.callingAeTitle "linkage" (printf "%s/linkage" (include "fracture.edgeDir" .)) "ledger" (printf "%s/export/ledger.db" (include "fracture.edgeDir" .)) "connect_timeout_ms" $e.connectTimeoutMs "timeout_ms" $e.timeoutMs -}}
{{- if $e.tls.enabled -}}
{{- $_ := required "export.tls.existingSecret: a Secret with the PACS's CA in ca.crt (and our tls.crt, tls.key if the PACS asks for them)" $e.tls.existingSecret -}}
{{- $dir := include "fracture.exportTlsDir" . -}}
{{- $_ := set $export "tls" true -}}
{{- $_ := set $export "tls_ca_file" (printf "%s/ca.crt" $dir) -}}
{{- if $e.tls.clientCertificate -}}
{{- $_ := set $export "tls_cert_file" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $export "tls_key_file" (printf "%s/tls.key" $dir) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "export" $export -}}
{{- end -}}
{{- toJson (mustMergeOverwrite $cfg (deepCopy (default dict $v.config))) -}}
{{- end -}}

{{- define "fracture.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/* One TOML value on one line (arrays and inline tables included); integers stay integers. */}}
{{- define "fracture.toml.value" -}}
{{- $x := . -}}
{{- if kindIs "string" $x -}}{{ toJson $x }}
{{- else if kindIs "bool" $x -}}{{ $x }}
{{- else if kindIs "float64" $x -}}{{ if eq $x (float64 (int64 $x)) }}{{ int64 $x }}{{ else }}{{ toJson $x }}{{ end }}
{{- else if or (kindIs "int" $x) (kindIs "int64" $x) -}}{{ $x }}
{{- else if kindIs "slice" $x -}}[{{ range $i, $e := $x }}{{ if $i }}, {{ end }}{{ include "fracture.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $x -}}{ {{- range $i, $k := keys $x | sortAlpha }}{{ if $i }}, {{ end }}{{ include "fracture.toml.key" $k }} = {{ include "fracture.toml.value" (get $x $k) }}{{ end -}} }
{{- else -}}{{ fail (printf "config: %v (%s) cannot be written to fracture.toml" $x (kindOf $x)) }}
{{- end -}}
{{- end -}}

{{/* A table: its keys, then its sub-tables under [a.b] headers; null values are left out. */}}
{{- define "fracture.toml.table" -}}
{{- $t := .table -}}
{{- $path := .path -}}
{{- range $k := keys $t | sortAlpha }}
{{- $x := get $t $k }}
{{- if not (or (kindIs "map" $x) (kindIs "invalid" $x)) }}
{{ include "fracture.toml.key" $k }} = {{ include "fracture.toml.value" $x }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $x := get $t $k }}
{{- if kindIs "map" $x }}
{{- $sub := append $path (include "fracture.toml.key" $k) }}

[{{ join "." $sub }}]
{{- include "fracture.toml.table" (dict "table" $x "path" $sub) }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "fracture.toml" -}}
# fracture.toml, written by the Helm chart from its values (`config` is merged over the rest).
# Set per pod through the environment instead (the StatefulSets): ingest.linkage (one file per
# pod), audit.database and audit.dashboard_token (from the Secret), model.manifest (over the
# image's own default).
{{- include "fracture.toml.table" (dict "table" (include "fracture.configDict" . | fromJson) "path" (list)) }}
{{- end -}}

{{/* The checksum that rolls the pods when fracture.toml or a chart-made Secret changes. */}}
{{- define "fracture.podChecksums" -}}
checksum/config: {{ include "fracture.toml" . | sha256sum }}
{{- if .Values.secrets.create }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end -}}
