"""Deployment files: the compose file against the Compose Specification's JSON Schema,
Prometheus config and alert rules with promtool, and the Grafana dashboard and alert rules
against the worker's real metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from stream.metrics import Metrics
from stream.segments import SegmentTable
from stream.validation import REASONS

ROOT = Path(__file__).parent.parent.parent


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "deploy/schema/compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert {"kafka", "topics", "redis", "worker", "prometheus", "grafana"} <= set(services)
    assert "ports" not in services["worker"]  # --scale worker=3 needs no host port per replica
    assert "container_name" not in services["worker"]
    init = "\n".join(services["topics"]["command"])
    assert re.search(r"--topic purchases .*retention\.ms=-1", init)
    assert "--appendonly" in services["redis"]["command"]
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed: .ci/run installs Debian's 'prometheus'")
        pytest.skip("promtool is absent (Debian package 'prometheus'); CI runs this check")
    return binary


def test_promtool_accepts_the_prometheus_config_and_rules():
    binary = promtool()
    for args in (["check", "config", "deploy/prometheus/prometheus.yml"],
                 ["check", "rules", "deploy/prometheus/rules.yml"]):
        out = subprocess.run([binary, *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def metric_names() -> set[str]:
    m = Metrics.create(segments=SegmentTable.load().segments, reasons=REASONS, partitions=1,
                       clusters=1)
    names = set()
    for family in m.registry.collect():  # a family without series yet (rfm_consumer_lag
        # has one only per partition whose lag is known) still counts by its name
        names |= {family.name} | {s.name for s in family.samples}
    return names


def test_dashboard_and_rules_use_only_metrics_the_worker_exports():
    known = metric_names()
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/rfm-stream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {n for e in exprs for n in re.findall(r"\brfm_[a-z_]+", e)}
    assert used and used <= known, used - known
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_kubernetes_manifests_are_consistent():
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "deploy/k8s").glob("*.yaml")}
    assert {d["kind"] for d in docs.values()} == {"ConfigMap", "Secret", "Deployment", "Service",
                                                  "PodMonitor"}
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    from stream.settings import Settings

    known = {f"RFM_{name.upper()}" for name in Settings.model_fields}
    for name in ("configmap.yaml", "secret.example.yaml"):
        data = docs[name].get("data") or docs[name].get("stringData")
        assert set(data) <= known, set(data) - known
