{{/* Names: <release>-<chart>, or the release name when it already says driftwarden (the
     default install, `helm install driftwarden`, names things as deploy/*.yaml does). */}}
{{- define "driftwarden.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "driftwarden.agent" -}}{{ include "driftwarden.fullname" . }}-agent{{- end -}}
{{- define "driftwarden.collector" -}}{{ include "driftwarden.fullname" . }}-collector{{- end -}}

{{- define "driftwarden.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "driftwarden.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The address agents dial: the collector Service's cluster DNS name. The collector's
     certificate must name it (`certs init --collector-names <this host>`). */}}
{{- define "driftwarden.collectorHost" -}}
{{ include "driftwarden.collector" . }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* A socket path of a unix:// endpoint (crictl's form) or of a bare absolute path. */}}
{{- define "driftwarden.socketPath" -}}
{{- trimPrefix "unix://" . -}}
{{- end -}}

{{/* The kube-rbac-proxy sidecar for a loopback metrics address (see values.yaml, metrics). */}}
{{- define "driftwarden.metricsProxy" -}}
- name: metrics-proxy
  image: {{ .root.Values.metrics.proxy.image }}
  args:
    - --secure-listen-address=0.0.0.0:{{ .port }}
    - --upstream=http://{{ .upstream }}/
    - --allow-paths=/metrics
  ports:
    - {name: metrics, containerPort: {{ .port }}, protocol: TCP}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: true
    runAsUser: 65534
    capabilities: {drop: [ALL]}
  resources: {{- toYaml .root.Values.metrics.proxy.resources | nindent 4 }}
  volumeMounts:
    - {name: metrics-proxy-token, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
{{- end -}}

{{/* The proxy's own token (the pod mounts none: see serviceAccount in values.yaml). */}}
{{- define "driftwarden.metricsProxyTokenVolume" -}}
- name: metrics-proxy-token
  projected:
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3600}
      - configMap:
          name: kube-root-ca.crt
          items: [{key: ca.crt, path: ca.crt}]
      - downwardAPI:
          items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]
{{- end -}}

{{- define "driftwarden.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ . | quote }}
prometheus.io/scheme: https
prometheus.io/path: /metrics
{{- end -}}
