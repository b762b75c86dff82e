{{/*
Guards for value combinations the schema cannot express. Each fails the render with a message
that names the keys and says what to set instead. Included once, from pytorchjob.yaml.
*/}}
{{- define "rsdino.validate" -}}
{{- $v := .Values }}
{{- $name := include "rsdino.fullname" . }}
{{- if and (not $v.fullnameOverride) (gt (len .Release.Name) 40) }}
{{- fail (printf "the release name %q has %d characters; the job name must fit in 40 so the operator's pod names <job>-worker-<i> stay DNS labels: use a shorter release name or fullnameOverride" .Release.Name (len .Release.Name)) }}
{{- end }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the job name %q is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter): use another release name or fullnameOverride" $name) }}
{{- end }}
{{- $min := int $v.elastic.minReplicas }}
{{- $max := int $v.elastic.maxReplicas }}
{{- $replicas := int $v.worker.replicas }}
{{- if gt $min $max }}
{{- fail (printf "elastic.minReplicas (%d) is greater than elastic.maxReplicas (%d)" $min $max) }}
{{- end }}
{{- if or (lt $replicas $min) (gt $replicas $max) }}
{{- fail (printf "worker.replicas (%d) must lie between elastic.minReplicas (%d) and elastic.maxReplicas (%d)" $replicas $min $max) }}
{{- end }}
{{- if and $v.checkpoint.uri $v.checkpoint.persistentVolumeClaim }}
{{- fail "set checkpoint.uri or checkpoint.persistentVolumeClaim, not both: checkpoints have one home" }}
{{- end }}
{{- if and (gt $max 1) (not $v.checkpoint.uri) (not $v.checkpoint.persistentVolumeClaim) }}
{{- fail (printf "elastic.maxReplicas is %d but checkpoints would stay on each pod's emptyDir: every rank must read the same checkpoints, so set checkpoint.uri (s3://...) or checkpoint.persistentVolumeClaim (a ReadWriteMany claim)" $max) }}
{{- end }}
{{- $gpus := int $v.worker.resources.gpus }}
{{- if kindIs "invalid" $v.worker.nprocPerNode }}
{{- if eq $gpus 0 }}
{{- fail "worker.nprocPerNode must be set when worker.resources.gpus is 0 (processes per CPU pod)" }}
{{- end }}
{{- else if and (gt $gpus 0) (ne (int $v.worker.nprocPerNode) $gpus) }}
{{- fail (printf "worker.nprocPerNode (%d) must equal worker.resources.gpus (%d): one process per GPU" (int $v.worker.nprocPerNode) $gpus) }}
{{- end }}
{{- $grace := int $v.worker.terminationGracePeriodSeconds }}
{{- $margin := int $v.worker.shutdownMarginSeconds }}
{{- if le $grace $margin }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be longer than worker.shutdownMarginSeconds (%d): torchrun needs time to checkpoint after SIGTERM" $grace $margin) }}
{{- end }}
{{- if and $v.data.uri (not (hasPrefix "s3://" $v.data.uri)) }}
{{- if not $v.data.persistentVolumeClaim }}
{{- fail (printf "data.uri %q is a local path: set data.persistentVolumeClaim (mounted at /data) or use an s3:// uri" $v.data.uri) }}
{{- end }}
{{- if not (or (eq $v.data.uri "/data") (hasPrefix "/data/" $v.data.uri)) }}
{{- fail (printf "data.uri %q must lie under /data, where data.persistentVolumeClaim is mounted" $v.data.uri) }}
{{- end }}
{{- end }}
{{- if and $v.data.persistentVolumeClaim (hasPrefix "s3://" $v.data.uri) }}
{{- fail "data.uri is on S3 and data.persistentVolumeClaim is set: use one of them" }}
{{- end }}
{{- if $v.metrics.enabled }}
{{- $last := add (int $v.metrics.port) (sub (int (include "rsdino.nprocPerNode" .)) 1) }}
{{- if and (le (int $v.metrics.port) 23456) (ge (int $last) 23456) }}
{{- fail (printf "metrics ports %d-%d include 23456, the operator's rendezvous port: move metrics.port" (int $v.metrics.port) (int $last)) }}
{{- end }}
{{- if gt (int $last) 65535 }}
{{- fail (printf "metrics ports %d-%d run past 65535: lower metrics.port" (int $v.metrics.port) (int $last)) }}
{{- end }}
{{- end }}
{{- range $v.worker.env }}
{{- if hasPrefix "PET_" (toString .name) }}
{{- fail (printf "worker.env sets %s: PET_* variables belong to the training operator (elastic.*, worker.nprocPerNode set them)" .name) }}
{{- end }}
{{- end }}
{{- $owned := dict
  "train.dataset.uri" "data.uri"
  "train.collective_timeout_s" "timeouts.collectiveSeconds"
  "checkpoint.dir" "checkpoint.uri or checkpoint.persistentVolumeClaim"
  "metrics.enabled" "metrics.enabled"
  "metrics.port" "metrics.port"
  "metrics.host" "nothing (the chart serves on the pod IP)"
  "metrics.job" "fullnameOverride" }}
{{- range $key, $instead := $owned }}
{{- $parts := splitList "." $key }}
{{- $node := $v.training.overrides }}
{{- range $i, $part := $parts }}
{{- if and (kindIs "map" $node) (hasKey $node $part) }}
{{- $node = get $node $part }}
{{- if eq $i (sub (len $parts) 1) }}
{{- fail (printf "training.overrides sets %s, which the chart derives: set %s instead" $key $instead) }}
{{- end }}
{{- else }}
{{- $node = dict }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $v.scheduling.gangScheduler "kueue" }}
{{- if not $v.scheduling.queue }}
{{- fail "scheduling.gangScheduler kueue needs scheduling.queue (the LocalQueue name)" }}
{{- end }}
{{- if not (kindIs "invalid" $v.scheduling.scheduleTimeoutSeconds) }}
{{- fail "scheduling.scheduleTimeoutSeconds is a Volcano setting; Kueue does not support it" }}
{{- end }}
{{- end }}
{{- if and (eq $v.scheduling.gangScheduler "none") (or $v.scheduling.queue $v.scheduling.priorityClass (not (kindIs "invalid" $v.scheduling.scheduleTimeoutSeconds))) }}
{{- fail "scheduling.queue, priorityClass and scheduleTimeoutSeconds need scheduling.gangScheduler volcano or kueue" }}
{{- end }}
{{- if and $v.elastic.metrics (eq $min $max) }}
{{- fail "elastic.metrics makes an autoscaler, but elastic.minReplicas equals elastic.maxReplicas: there is nothing to scale" }}
{{- end }}
{{- if and (not $v.metrics.enabled) (or (eq (toString $v.metrics.podMonitor.enabled) "true") (eq (toString $v.metrics.serviceMonitor.enabled) "true")) }}
{{- fail "metrics.podMonitor/serviceMonitor.enabled is true but metrics.enabled is false: there is nothing to scrape" }}
{{- end }}
{{- end }}
