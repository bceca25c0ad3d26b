{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "aio-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed to the chart name unless it holds it. */}}
{{- define "aio-gateway.fullname" -}}
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

{{- define "aio-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "aio-gateway.labels" -}}
helm.sh/chart: {{ include "aio-gateway.chart" . }}
{{ include "aio-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the gateway's pods. */}}
{{- define "aio-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aio-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The Secret and key that hold the upstream key. */}}
{{- define "aio-gateway.apiKeySecretName" -}}
{{- .Values.upstream.existingSecret | default (include "aio-gateway.fullname" .) }}
{{- end }}

{{- define "aio-gateway.apiKeySecretKey" -}}
{{- if .Values.upstream.existingSecret }}
{{- .Values.upstream.existingSecretKey }}
{{- else -}}
api-key
{{- end }}
{{- end }}

{{/* The Secret and key that hold the metrics token; empty when /metrics is open. */}}
{{- define "aio-gateway.metricsTokenSecretName" -}}
{{- if .Values.metrics.existingSecret }}
{{- .Values.metrics.existingSecret }}
{{- else if .Values.metrics.bearerToken }}
{{- include "aio-gateway.fullname" . }}
{{- end }}
{{- end }}

{{- define "aio-gateway.metricsTokenSecretKey" -}}
{{- if .Values.metrics.existingSecret }}
{{- .Values.metrics.existingSecretKey }}
{{- else -}}
metrics-token
{{- end }}
{{- end }}

{{/* The upstream accounts (`upstream.accounts`); empty: the one key of `upstream.apiKey`. */}}
{{- define "aio-gateway.accounts" -}}
{{- .Values.upstream.accounts | default list | toJson }}
{{- end }}

{{/* An account's environment variable: APIINONE_API_KEY_<ID>, its id upper-cased with every
character other than a letter or digit made `_`. */}}
{{- define "aio-gateway.accountEnv" -}}
{{- printf "APIINONE_API_KEY_%s" (regexReplaceAll "[^A-Z0-9]" (upper (toString .id)) "_") }}
{{- end }}

{{/* An account's key in the chart's own Secret. */}}
{{- define "aio-gateway.accountSecretKey" -}}
{{- printf "account-%s" (toString .id) }}
{{- end }}

{{/* Whether the chart's own Secret is rendered: the upstream key (or an account's), the metrics
token, or both. */}}
{{- define "aio-gateway.ownSecret" -}}
{{- $accounts := include "aio-gateway.accounts" . | fromJsonArray }}
{{- $accountKey := false }}
{{- range $accounts }}{{ if .apiKey }}{{ $accountKey = true }}{{ end }}{{ end }}
{{- if or (and (not $accounts) (not .Values.upstream.existingSecret)) $accountKey (and .Values.metrics.bearerToken (not .Values.metrics.existingSecret)) -}}
true
{{- end }}
{{- end }}

{{/*
store.url for the rendered config: the Redis URL from a Secret (through the environment), else
redis.url, else the config's own store.url, else memory://.
*/}}
{{- define "aio-gateway.storeUrl" -}}
{{- if .Values.redis.existingSecret -}}
${AIO_GATEWAY_REDIS_URL}
{{- else if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else }}
{{- dig "store" "url" "memory://" .Values.config }}
{{- end }}
{{- end }}

{{/*
Refuse combinations that cannot work: several pods or workers on the per-process memory://
store, an upstream key or a metrics token in the config itself, no upstream key at all.
*/}}
{{- define "aio-gateway.validate" -}}
{{- $memory := hasPrefix "memory://" (include "aio-gateway.storeUrl" .) }}
{{- if and $memory (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail "replicaCount > 1 and autoscaling need a shared store: set redis.url (or redis.existingSecret); memory:// keeps quotas, budgets and the cache inside one process" }}
{{- end }}
{{- if and $memory (gt (int .Values.workers) 1) }}
{{- fail "workers > 1 needs a shared store: set redis.url (or redis.existingSecret)" }}
{{- end }}
{{- if hasKey (.Values.config.upstream | default dict) "api_key" }}
{{- fail "config.upstream.api_key must not be set: the chart renders ${APIINONE_API_KEY}; give the key in upstream.apiKey or upstream.existingSecret" }}
{{- end }}
{{- if and .Values.ledger.url .Values.ledger.existingSecret }}
{{- fail "set ledger.url (the chart creates a Secret) or ledger.existingSecret, not both" }}
{{- end }}
{{- if hasKey (.Values.config.ledger | default dict) "url" }}
{{- fail "config.ledger.url must not be set: the URL holds a password; give it in ledger.url or ledger.existingSecret" }}
{{- end }}
{{- if hasKey (get (.Values.config | default dict) "metrics" | default dict) "bearer_token" }}
{{- fail "config.metrics.bearer_token must not be set: give the token in metrics.bearerToken or metrics.existingSecret (the chart renders ${METRICS_TOKEN})" }}
{{- end }}
{{- if and .Values.webhooks.secrets .Values.webhooks.existingSecret }}
{{- fail "set webhooks.secrets (the chart creates a Secret) or webhooks.existingSecret, not both" }}
{{- end }}
{{- range $name, $_ := .Values.webhooks.secrets }}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" $name) }}
{{- fail (printf "webhooks.secrets.%s: the key becomes an environment variable: letters, digits and _" $name) }}
{{- end }}
{{- end }}
{{- range $team, $settings := (.Values.config.teams | default dict) }}
{{- with (get ($settings | default dict) "callbacks") }}
{{- $secrets := values (get . "secrets" | default dict) }}
{{- range (prepend $secrets (get . "secret" | default "")) }}
{{- if hasPrefix "whsec_" (toString .) }}
{{- fail (printf "config.teams.%s.callbacks: a signing secret must not be in the config (it lands in a ConfigMap): write ${VAR} and give the variable in webhooks.secrets or webhooks.existingSecret" $team) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $accounts := include "aio-gateway.accounts" . | fromJsonArray }}
{{- if hasKey (.Values.config.upstream | default dict) "accounts" }}
{{- fail "config.upstream.accounts must not be set: give the accounts in upstream.accounts (the chart renders each key as a ${VAR} from a Secret)" }}
{{- end }}
{{- if and $accounts (or .Values.upstream.apiKey .Values.upstream.existingSecret) }}
{{- fail "set upstream.accounts or the one key (upstream.apiKey or upstream.existingSecret), not both" }}
{{- end }}
{{- if and (not $accounts) (not .Values.upstream.apiKey) (not .Values.upstream.existingSecret) }}
{{- fail "set upstream.apiKey (the chart creates a Secret) or upstream.existingSecret (a Secret you manage), or upstream.accounts" }}
{{- end }}
{{- $envs := dict }}
{{- range $i, $account := $accounts }}
{{- $where := printf "upstream.accounts[%d]" $i }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$" (toString (get $account "id" | default ""))) }}
{{- fail (printf "%s.id: an account id (letters, digits, _ . -, at most 64) is required" $where) }}
{{- end }}
{{- if hasKey $account "api_key" }}
{{- fail (printf "%s.api_key must not be set: the key would land in a ConfigMap; give it in apiKey (the chart's Secret) or existingSecret and existingSecretKey" $where) }}
{{- end }}
{{- if eq (empty (get $account "apiKey")) (empty (get $account "existingSecret")) }}
{{- fail (printf "%s: set apiKey (the chart creates a Secret) or existingSecret and existingSecretKey (a Secret you manage), one of the two" $where) }}
{{- end }}
{{- if and (get $account "existingSecret") (not (get $account "existingSecretKey")) }}
{{- fail (printf "%s.existingSecretKey: the key of the API key in Secret %s is required" $where $account.existingSecret) }}
{{- end }}
{{- $env := include "aio-gateway.accountEnv" $account }}
{{- if hasKey $envs $env }}
{{- fail (printf "%s.id: its key's environment variable %s is also that of account %s: ids must differ by more than case and punctuation" $where $env (get $envs $env)) }}
{{- end }}
{{- $_ := set $envs $env $account.id }}
{{- end }}
{{- end }}

{{/* The gateway's config file: the `config` value with store.url, upstream.api_key, (with the
ledger on) ledger.url and (with tracing on) tracing.endpoint and tracing.sample_ratio set. */}}
{{- define "aio-gateway.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $upstream := deepCopy (get $config "upstream" | default dict) }}
{{- $accounts := include "aio-gateway.accounts" . | fromJsonArray }}
{{- if $accounts }}
{{- $rendered := list }}
{{- range $accounts }}
{{- $account := omit . "apiKey" "existingSecret" "existingSecretKey" }}
{{- $_ := set $account "api_key" (printf "${%s}" (include "aio-gateway.accountEnv" .)) }}
{{- $rendered = append $rendered $account }}
{{- end }}
{{- $_ := set $upstream "accounts" $rendered }}
{{- else }}
{{- $_ := set $upstream "api_key" "${APIINONE_API_KEY}" }}
{{- end }}
{{- $_ := set $config "upstream" $upstream }}
{{- $store := deepCopy (get $config "store" | default dict) }}
{{- $_ := set $store "url" (include "aio-gateway.storeUrl" .) }}
{{- $_ := set $config "store" $store }}
{{- if include "aio-gateway.ledgerEnabled" . }}
{{- $ledger := deepCopy (get $config "ledger" | default dict) }}
{{- $_ := set $ledger "url" "${AIO_GATEWAY_LEDGER_URL}" }}
{{- $_ := set $config "ledger" $ledger }}
{{- end }}
{{- if .Values.tracing.endpoint }}
{{- $tracing := deepCopy (get $config "tracing" | default dict) }}
{{- $_ := set $tracing "endpoint" .Values.tracing.endpoint }}
{{- $_ := set $tracing "sample_ratio" .Values.tracing.sampleRatio }}
{{- $_ := set $config "tracing" $tracing }}
{{- end }}
{{- if include "aio-gateway.metricsTokenSecretName" . }}
{{- $metrics := deepCopy (get $config "metrics" | default dict) }}
{{- $_ := set $metrics "bearer_token" "${METRICS_TOKEN}" }}
{{- $_ := set $config "metrics" $metrics }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Seconds Kubernetes waits after SIGTERM: preStop sleep + the gateway's drain + a margin. */}}
{{- define "aio-gateway.terminationGracePeriod" -}}
{{- $grace := dig "listen" "shutdown_grace_s" 30 .Values.config | ceil | int }}
{{- add $grace (int .Values.preStopSleepSeconds) 10 }}
{{- end }}

{{- define "aio-gateway.port" -}}
{{- dig "listen" "port" 8080 .Values.config | int }}
{{- end }}

{{/*
The container's environment: the secrets the rendered config reads (${APIINONE_API_KEY}, or
${APIINONE_API_KEY_<ID>} for each of `upstream.accounts`, and
${AIO_GATEWAY_REDIS_URL} / ${AIO_GATEWAY_LEDGER_URL} when they come from Secrets), shared by
the gateway and the ledger migration Job.
*/}}
{{- define "aio-gateway.env" -}}
{{- $accounts := include "aio-gateway.accounts" . | fromJsonArray }}
{{- if $accounts }}
{{- $env := list }}
{{- range $accounts }}
{{- $ref := dict "name" (include "aio-gateway.fullname" $) "key" (include "aio-gateway.accountSecretKey" .) }}
{{- if .existingSecret }}
{{- $ref = dict "name" .existingSecret "key" .existingSecretKey }}
{{- end }}
{{- $env = append $env (dict "name" (include "aio-gateway.accountEnv" .) "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- end }}
{{- toYaml $env }}
{{- else -}}
- name: APIINONE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "aio-gateway.apiKeySecretName" . }}
      key: {{ include "aio-gateway.apiKeySecretKey" . }}
{{- end }}
{{- if include "aio-gateway.metricsTokenSecretName" . }}
- name: METRICS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "aio-gateway.metricsTokenSecretName" . }}
      key: {{ include "aio-gateway.metricsTokenSecretKey" . }}
{{- end }}
{{- if .Values.redis.existingSecret }}
- name: AIO_GATEWAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- if include "aio-gateway.ledgerEnabled" . }}
- name: AIO_GATEWAY_LEDGER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ledger.existingSecret | default (printf "%s-ledger" (include "aio-gateway.fullname" .)) }}
      key: {{ if .Values.ledger.existingSecret }}{{ .Values.ledger.existingSecretKey }}{{ else }}ledger-url{{ end }}
{{- end }}
{{- if .Values.tracing.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.tracing.headersSecret }}
      key: {{ .Values.tracing.headersSecretKey }}
{{- end }}
{{- if gt (int .Values.workers) 1 }}
- name: PROMETHEUS_MULTIPROC_DIR
  value: /tmp/metrics
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* "true" when the ledger of record (PostgreSQL) is on. */}}
{{- define "aio-gateway.ledgerEnabled" -}}
{{- if or .Values.ledger.url .Values.ledger.existingSecret }}true{{ end }}
{{- end }}

{{/* The Secret whose keys become environment variables (task webhook secrets); empty if none. */}}
{{- define "aio-gateway.webhooksSecretName" -}}
{{- if .Values.webhooks.existingSecret }}
{{- .Values.webhooks.existingSecret }}
{{- else if .Values.webhooks.secrets }}
{{- include "aio-gateway.fullname" . }}-webhooks
{{- end }}
{{- end }}

{{/* The container's envFrom: the webhook secrets, shared by the gateway and the ledger Job. */}}
{{- define "aio-gateway.envFrom" -}}
{{- with include "aio-gateway.webhooksSecretName" . }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}
