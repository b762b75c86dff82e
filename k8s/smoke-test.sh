#!/usr/bin/env bash
# Smoke test of the rsdino-pretrain chart on a REAL cluster (the CI here has none): install a tiny
# CPU job (2 elastic workers, 1:2), wait for a checkpoint, delete worker-0's pod (the rendezvous
# host), wait for the job to resume from a checkpoint, scale it to one worker, wait for
# Succeeded, print a summary and uninstall. See k8s/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: k8s/smoke-test.sh (--pvc CLAIM | --s3 s3://BUCKET/PREFIX) [options]

Runs a tiny CPU rsdino job through the chart on the current kubectl context and checks that it
survives the loss of worker-0 and a scale-down. Needs kubectl, helm, the Kubeflow training
operator (CRD pytorchjobs.kubeflow.org) and an image the nodes can pull.

Checkpoint storage (one of them is required):
  --pvc CLAIM            existing ReadWriteMany claim in the namespace (checkpoints go to
                         /checkpoints/<release> on it)
  --s3 URI               s3://bucket/prefix; the job writes under URI/<release>
  --s3-secret NAME       Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default: rsdino-s3)
  --s3-endpoint URL      S3 endpoint for MinIO/Ceph (default: AWS)
  --s3-path-style        path-style bucket addressing (MinIO/Ceph)

Options:
  -n, --namespace NS     namespace (default: ml)
  --release NAME         Helm release (default: rsdino-smoke-<random>; a fresh name per run, so
                         it never resumes an earlier run's checkpoints)
  --image REPO:TAG       trainer image (default: the chart's image.repository:appVersion)
  --timeout SECONDS      limit of each wait (default: 900)
  --keep                 do not uninstall the release at the end
  -h, --help             this text

Exit status: 0 when every step passed, 1 when one failed or timed out, 2 on a usage error.
EOF
}

die_usage() {
  printf 'smoke-test: %s\n\n' "$1" >&2
  usage >&2
  exit 2
}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }

fail() {
  log "FAILED: $*" >&2
  exit 1
}

# ---- arguments ----
namespace=ml
release="rsdino-smoke-$(tr -dc 'a-z0-9' </dev/urandom | head -c 6 || true)"
pvc=""
s3_uri=""
s3_secret=rsdino-s3
s3_endpoint=""
s3_path_style=false
image=""
timeout_s=900
keep=false
poll_s=5

while (($# > 0)); do
  case "$1" in
    --pvc) pvc="${2:?--pvc needs a claim name}"; shift 2 ;;
    --s3) s3_uri="${2:?--s3 needs a URI}"; shift 2 ;;
    --s3-secret) s3_secret="${2:?--s3-secret needs a name}"; shift 2 ;;
    --s3-endpoint) s3_endpoint="${2:?--s3-endpoint needs a URL}"; shift 2 ;;
    --s3-path-style) s3_path_style=true; shift ;;
    -n | --namespace) namespace="${2:?--namespace needs a name}"; shift 2 ;;
    --release) release="${2:?--release needs a name}"; shift 2 ;;
    --image) image="${2:?--image needs REPO:TAG}"; shift 2 ;;
    --timeout) timeout_s="${2:?--timeout needs seconds}"; shift 2 ;;
    --keep) keep=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done

if [[ -n "$pvc" && -n "$s3_uri" ]]; then die_usage "give --pvc or --s3, not both"; fi
if [[ -z "$pvc" && -z "$s3_uri" ]]; then die_usage "checkpoint storage missing: --pvc or --s3"; fi
if [[ -n "$s3_uri" && "$s3_uri" != s3://?* ]]; then die_usage "--s3 must be an s3:// URI"; fi
if [[ ! "$timeout_s" =~ ^[1-9][0-9]*$ ]]; then die_usage "--timeout must be a positive integer"; fi
if [[ ! "$release" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]]; then
  die_usage "--release must be a DNS-1035 label of at most 40 characters"
fi
image_repository=""
image_tag=""
if [[ -n "$image" ]]; then
  # REPO:TAG, where REPO may hold a registry port (host:5000/name): split at the last colon
  # after the last slash.
  [[ "${image##*/}" == *:* ]] || die_usage "--image must be REPO:TAG"
  image_repository="${image%:*}"
  image_tag="${image##*:}"
fi

chart_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../helm/rsdino-pretrain" && pwd)"
work_dir="$(mktemp -d)"
job=""
installed=false
started_at=$SECONDS

# ---- cluster queries ----
kc() { kubectl --namespace "$namespace" "$@"; }

# The status ("True"/"False"/"") of one condition of the job.
job_condition() {
  kc get pytorchjob "$job" -o "jsonpath={.status.conditions[?(@.type==\"$1\")].status}" 2>/dev/null
}

job_is() { [[ "$(job_condition "$1")" == True ]]; }

# The current logs of every pod of the job, each line prefixed by its pod.
job_logs() {
  kc logs -l "training.kubeflow.org/job-name=$job" --tail=-1 --prefix --max-log-requests=10 \
    2>/dev/null || true
}

logs_match() {
  local logs
  logs="$(job_logs)"
  grep -Eq -- "$1" <<<"$logs"
}

pod_field() { kc get pod "$1" -o "jsonpath=$2" 2>/dev/null || true; }

# wait_until DESCRIPTION COMMAND...: poll COMMAND until it succeeds; fail on timeout or when the
# job has failed meanwhile.
wait_until() {
  local what="$1" deadline=$((SECONDS + timeout_s))
  shift
  log "waiting (up to ${timeout_s}s) for $what"
  until "$@"; do
    if [[ -n "$job" ]] && job_is Failed; then fail "the job failed while waiting for $what"; fi
    if ((SECONDS >= deadline)); then fail "timed out after ${timeout_s}s waiting for $what"; fi
    sleep "$poll_s"
  done
}

# ---- cleanup: diagnostics on failure, then uninstall ----
cleanup() {
  local status=$?
  if ((status != 0)) && [[ -n "$job" ]]; then
    log "diagnostics for pytorchjob/$job:"
    kc describe pytorchjob "$job" || true
    kc get pods -l "training.kubeflow.org/job-name=$job" -o wide || true
    job_logs | tail -n 60 || true
  fi
  if [[ "$installed" == true && "$keep" == false ]]; then
    log "uninstalling release $release"
    helm uninstall "$release" --namespace "$namespace" --wait --timeout "${timeout_s}s" || true
  elif [[ "$installed" == true ]]; then
    log "kept release $release (helm uninstall $release -n $namespace removes it)"
  fi
  rm -rf "$work_dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 1. prerequisites ----
for tool in kubectl helm; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH"
done
log "context: $(kubectl config current-context 2>/dev/null || echo '<none>'), namespace: $namespace"
kubectl get crd pytorchjobs.kubeflow.org >/dev/null ||
  fail "CRD pytorchjobs.kubeflow.org missing: install the Kubeflow training operator v1.9 (k8s/README.md)"
for crd in podmonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com; do
  if kubectl get crd "$crd" >/dev/null 2>&1; then
    log "found CRD $crd: the chart creates its monitoring objects"
  else
    log "no CRD $crd: the chart skips those objects (optional)"
  fi
done
kubectl get namespace "$namespace" >/dev/null || fail "namespace $namespace missing (kubectl apply -k k8s/)"
if [[ -n "$pvc" ]]; then
  modes="$(kc get pvc "$pvc" -o 'jsonpath={.spec.accessModes}')" || fail "claim $pvc not found"
  [[ "$modes" == *ReadWriteMany* ]] ||
    log "warning: claim $pvc is not ReadWriteMany ($modes): pods on different nodes cannot share it"
else
  kc get secret "$s3_secret" >/dev/null || fail "Secret $s3_secret not found (k8s/s3-secret.example.yaml)"
fi

# ---- 2. install a tiny CPU job ----
# quickstart shrunk for CPU pods: 8 epochs x 50 steps, a checkpoint every 25 steps, so the job
# runs long enough to lose a pod and scale down before it finishes.
values="$work_dir/values.yaml"
cat >"$values" <<VALUES
training:
  preset: quickstart
  overrides:
    train:
      device: cpu
      num_workers: 1
      batch_size_per_gpu: 16
      OFFICIAL_EPOCH_LENGTH: 50
      log_every_steps: 5
    optim:
      epochs: 8
    checkpoint:
      every_steps: 25
worker:
  replicas: 2
  nprocPerNode: 1
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 120
  resources:
    gpus: 0
    cpu: "2"
    memory: 4Gi
  shmSizeLimit: 1Gi
  scratchSizeLimit: 5Gi
elastic:
  minReplicas: 1
  maxReplicas: 2
  maxRestarts: 5
  joinTimeoutSeconds: 300
  lastCallTimeoutSeconds: 30
timeouts:
  collectiveSeconds: 120
runPolicy:
  backoffLimit: 6
  cleanPodPolicy: None
VALUES
if [[ -n "$pvc" ]]; then
  cat >>"$values" <<VALUES
checkpoint:
  persistentVolumeClaim: ${pvc}
VALUES
else
  cat >>"$values" <<VALUES
checkpoint:
  uri: ${s3_uri%/}/${release}
s3:
  endpoint: "${s3_endpoint}"
  pathStyle: ${s3_path_style}
  credentialsSecret: ${s3_secret}
VALUES
fi
if [[ -n "$image" ]]; then
  cat >>"$values" <<VALUES
image:
  repository: ${image_repository}
  tag: "${image_tag}"
VALUES
fi

log "installing release $release from $chart_dir"
installed=true
helm install "$release" "$chart_dir" --namespace "$namespace" --values "$values" \
  --timeout "${timeout_s}s"
job="$(kc get pytorchjobs -l "app.kubernetes.io/instance=$release" \
  -o 'jsonpath={.items[0].metadata.name}')"
[[ -n "$job" ]] || fail "the release created no PyTorchJob"
log "pytorchjob: $job"

# ---- 3. running, first checkpoint ----
wait_until "pytorchjob/$job to be Running" job_is Running
checkpoint_line='checkpoint [^ ]*step_[0-9]+ complete'
wait_until "a complete checkpoint in the logs" logs_match "$checkpoint_line"
first_checkpoint="$(job_logs | grep -Eo -- "$checkpoint_line" | grep -Eo 'step_[0-9]+' | tail -n 1)"
first_step=$((10#${first_checkpoint#step_}))
log "first complete checkpoint: step $first_step"

# ---- 4. lose worker-0 (the rendezvous host): SIGTERM, preemption checkpoint, new pod ----
old_uid="$(pod_field "$job-worker-0" '{.metadata.uid}')"
log "deleting pod $job-worker-0 (uid $old_uid) with its grace period"
kc delete pod "$job-worker-0" --wait=false
worker0_replaced() {
  local uid phase
  uid="$(pod_field "$job-worker-0" '{.metadata.uid}')"
  phase="$(pod_field "$job-worker-0" '{.status.phase}')"
  [[ -n "$uid" && "$uid" != "$old_uid" && "$phase" == Running ]]
}
wait_until "a new $job-worker-0 pod to run" worker0_replaced
resumed_line='resumed from [^ ]+ \(step [0-9]+'
wait_until "the job to resume from a checkpoint" logs_match "$resumed_line"
resumed_step="$(job_logs | grep -Eo -- "$resumed_line" | grep -Eo '[0-9]+$' | sort -n | tail -n 1)"
((resumed_step >= first_step)) ||
  fail "resumed from step $resumed_step, before the checkpoint of step $first_step"
log "resumed from step $resumed_step"

# ---- 5. elastic scale-down: 2 -> 1 worker ----
log "scaling pytorchjob/$job to 1 worker"
kc scale pytorchjob "$job" --replicas=1
worker1_gone() { [[ -z "$(pod_field "$job-worker-1" '{.metadata.name}')" ]]; }
wait_until "pod $job-worker-1 to be removed" worker1_gone

# ---- 6. done ----
wait_until "pytorchjob/$job to succeed" job_is Succeeded
last_checkpoint="$(job_logs | grep -Eo -- "$checkpoint_line" | grep -Eo 'step_[0-9]+' | tail -n 1 || true)"

log "summary"
printf '  release:           %s (namespace %s)\n' "$release" "$namespace"
printf '  first checkpoint:  step %s\n' "$first_step"
printf '  resumed from:      step %s after deleting %s-worker-0\n' "$resumed_step" "$job"
printf '  last checkpoint:   %s\n' "${last_checkpoint:-<not in the current logs>}"
printf '  conditions:        %s\n' \
  "$(kc get pytorchjob "$job" -o 'jsonpath={range .status.conditions[*]}{.type}={.status} {end}')"
printf '  elapsed:           %ss\n' "$((SECONDS - started_at))"
kc get pods -l "training.kubeflow.org/job-name=$job" \
  -o 'custom-columns=POD:.metadata.name,PHASE:.status.phase,RESTARTS:.status.containerStatuses[0].restartCount'
log "smoke test passed"
