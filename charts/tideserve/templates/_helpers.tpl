{{- define "tideserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tideserve.labels" -}}
app.kubernetes.io/name: tideserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tideserve.selectorLabels" -}}
app.kubernetes.io/name: tideserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tideserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tideserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tideserve.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/* The rules for LLMDeployments and their children: exactly the verbs the operator uses. */}}
{{/* The namespaces the operator watches, as JSON: the release's own unless clusterWide or watchNamespaces say
otherwise; [] means every namespace (clusterWide). */}}
{{- define "tideserve.watchNamespaces" -}}
{{- if and .Values.clusterWide .Values.watchNamespaces -}}
{{- fail "set clusterWide or watchNamespaces, not both" -}}
{{- else if .Values.clusterWide -}}
[]
{{- else if .Values.watchNamespaces -}}
{{ toJson .Values.watchNamespaces }}
{{- else -}}
{{ list .Release.Namespace | toJson }}
{{- end -}}
{{- end -}}

{{- define "tideserve.workloadRules" -}}
# patch: kopf's bookkeeping annotation.
- apiGroups: [tideserve.io]
  resources: [llmdeployments]
  verbs: [get, list, watch, patch]
# The autoscaler writes spec.replicas (mode active) through the scale subresource, its reason in status.
- apiGroups: [tideserve.io]
  resources: [llmdeployments/scale]
  verbs: [patch]
- apiGroups: [tideserve.io]
  resources: [llmdeployments/status]
  verbs: [patch]
# The children's owner references set blockOwnerDeletion (foreground deletion waits for them): under the
# OwnerReferencesPermissionEnforcement admission plugin (on by default in OpenShift) that needs update on the
# owner's finalizers. The operator never writes finalizers.
- apiGroups: [tideserve.io]
  resources: [llmdeployments/finalizers]
  verbs: [update]
# delete: the router's Deployment and the workers' headless Service when spec.router turns off.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# The autoscaler trusts only pods whose ReplicaSet its Deployment controls.
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [list]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# pods: status and the autoscaler's metrics; patch sets the deletion cost of the pods a scale-down drains.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch]
# The bearer token of the workers' admin port, one Secret NAME-admin per LLMDeployment (tideserve engine): the
# operator writes it (a token derived from its mounted admin key) and deletes it when the engine turns vllm. It
# never reads a Secret: no get, list or watch.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch, delete]
# The autoscaler's learned state, one ConfigMap NAME-autoscaler-state per LLMDeployment.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{- define "tideserve.adminKeySecret" -}}
{{- .Values.adminKey.existingSecret | default (printf "%s-admin-key" (include "tideserve.fullname" .)) -}}
{{- end -}}
